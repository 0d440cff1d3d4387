"""Two runs in one torchrun launch, for tests/test_distributed.py: chapter 11's demo (saved by
process 0), then chapter 11's training command (`-m qlora_mini.distributed`: chapter 8's command
with FSDPProcesses) with the remaining arguments. Starting the two processes costs ~20 s of CPU on
2 cores (torch, transformers, bitsandbytes): paid once, not twice.

    torchrun --standalone --nproc_per_node 2 tests/torchrun_two_runs.py STEPS DEMO.pt TRAIN-ARGS...
"""
import sys

import torch
import torch.distributed as dist

from qlora_mini import distributed as D

steps, demo_out, *train_argv = sys.argv[1:]
result = D.demo_run(int(steps))
if dist.get_rank() == 0:
    torch.save(result, demo_out)
D.main(train_argv)          # joins the demo's process group, and ends it
