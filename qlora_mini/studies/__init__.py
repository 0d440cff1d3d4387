"""The book's studies (hand-written plumbing): the experiments that test the paper's findings.

- chapter 9, the Elo tournament: ``elo`` (ratings and their intervals), ``elo_data`` (the paper's
  released GPT-4 verdicts, shipped in ``data/qlora_eval/``), ``elo_generate`` (a model's answers);
- chapter 12, data types: ``model_family`` (the family of models), ``datatypes`` (storage by data
  type and held-out NLL), ``experiments`` (the resumable sweep command), ``llm_datatypes`` (the
  same question on a real LLM, SmolLM2-135M, scored on OASST1 replies);
- chapter 13, QLoRA against 16-bit finetuning: ``finetuning``.

Each module is generated from its chapter's notebook. This file imports none of them.
"""
