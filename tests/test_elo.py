"""qlora_mini.studies.elo / elo_data / elo_generate against independent computations: Elo by hand and by
a plain Python loop, Bradley-Terry in closed form and by Hunter's MM iteration, the released data
re-read with the standard library."""
import csv
import gzip
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest

from qlora_mini.studies.elo import (bradley_terry, elo_bootstrap, elo_ratings, elo_tournament,
                            elo_update, expected_score, order_consistency, separability,
                            win_rate_matrix)
from qlora_mini.exercises.elo import (check_bradley_terry, check_elo_update, check_spread,
                                   check_win_rate_matrix, random_games, spread)
from qlora_mini.exercises import ExerciseFailed
from qlora_mini.studies.elo_data import (DATA, MODELS, load_paper_verdicts, load_relative_scores,
                                 percent_of_chatgpt)


def games_of(rows, prompts=None):
    a, b, s = zip(*rows)
    return pd.DataFrame({"model_a": a, "model_b": b, "score_a": s,
                         "prompt_id": prompts or [str(i) for i in range(len(rows))]})


def plain_elo(rows, k=32.0, initial=1000.0):
    """Elo the way it is written on paper: one game at a time, dictionaries, math.pow."""
    r = {m: initial for a, b, _ in rows for m in (a, b)}
    for a, b, s in rows:
        e = 1.0 / (1.0 + math.pow(10.0, (r[b] - r[a]) / 400.0))
        r[a], r[b] = r[a] + k * (s - e), r[b] - k * (s - e)
    return r


def test_update_by_hand():
    assert elo_update(1000.0, 1000.0, 1.0) == (1016.0, 984.0)  # E = 1/2, K/2 each way
    assert expected_score(1200.0, 1000.0) == pytest.approx(1 / (1 + 10 ** -0.5))
    ra, rb = elo_update(1200.0, 1000.0, 0.5, k=10.0)
    assert ra == pytest.approx(1200 + 10 * (0.5 - 1 / (1 + 10 ** -0.5)))
    assert ra + rb == pytest.approx(2200.0)


def test_small_tournament_by_hand():
    """A beats B, then B ties C, then C beats A; K = 32, all start at 1000."""
    rows = [("A", "B", 1.0), ("B", "C", 0.5), ("C", "A", 1.0)]
    e_b = 1 / (1 + 10 ** ((1000 - 984) / 400))  # B (984) against C (1000)
    b, c = 984 + 32 * (0.5 - e_b), 1000 - 32 * (0.5 - e_b)
    e_c = 1 / (1 + 10 ** ((1016 - c) / 400))  # C against A (1016)
    want = {"A": 1016 - 32 * (1 - e_c), "B": b, "C": c + 32 * (1 - e_c)}
    models, r = elo_ratings(games_of(rows), [[0, 1, 2]])
    assert dict(zip(models, r[0])) == pytest.approx(want, abs=1e-9)


def test_every_ordering_matches_a_plain_loop_and_padding_is_no_game():
    g = random_games(3, 3, np.random.default_rng(1))  # 3 round-robin ties + 3 random games
    rows = list(g[["model_a", "model_b", "score_a"]].itertuples(index=False, name=None))
    perms = list(itertools.permutations(range(len(rows))))
    padded = [list(p[:2]) + [-1] + list(p[2:]) + [-1] for p in perms]
    models, r = elo_ratings(g, padded)
    for p, got in zip(perms, r):
        want = plain_elo([rows[i] for i in p])
        assert got == pytest.approx([want[m] for m in models], abs=1e-9)
    assert r.sum(axis=1) == pytest.approx(1000.0 * len(models))  # zero-sum


def test_tournament_is_the_mean_over_orderings():
    rows = [("A", "B", 1.0), ("B", "C", 0.5), ("C", "A", 1.0), ("A", "C", 0.0)]
    exact = pd.DataFrame([plain_elo([rows[i] for i in p])
                          for p in itertools.permutations(range(4))]).mean()
    got = elo_tournament(games_of(rows), orderings=20_000, seed=3)
    # 20,000 random orderings of 24 equally likely ones: the mean is within a few ci95
    assert (got["elo"] - exact[got.index]).abs().max() < 0.5
    assert (got["ci95"] < 0.5).all() and (got["p2.5"] <= got["elo"]).all()
    assert list(got.index) == list(got["elo"].sort_values(ascending=False).index)



def test_sampled_tournament_is_the_mean_over_ordered_draws():
    """sample=2 of 4 games: each ordering plays an ordered draw of 2 distinct games, all 12 equally
    likely; the exact mean from a plain loop over all 12. sample=len(games) is the full tournament,
    game for game (the same seed gives the same orderings)."""
    rows = [("A", "B", 1.0), ("B", "C", 0.5), ("C", "A", 1.0), ("A", "C", 0.0)]
    exact = pd.DataFrame([{**dict.fromkeys("ABC", 1000.0), **plain_elo([rows[i] for i in p])}
                          for p in itertools.permutations(range(4), 2)]).mean()  # idle: 1000
    got = elo_tournament(games_of(rows), orderings=20_000, seed=3, sample=2)
    assert (got["elo"] - exact[got.index]).abs().max() < 0.5
    full = elo_tournament(games_of(rows), orderings=50, seed=1)
    pd.testing.assert_frame_equal(elo_tournament(games_of(rows), orderings=50, seed=1, sample=4),
                                  full)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="sample must be between 1 and the 4 games"):
            elo_tournament(games_of(rows), orderings=2, sample=bad)

def test_bradley_terry_two_models_closed_form():
    # A scores 2.5 of 4 (two wins, a tie, a loss): exp(theta_A - theta_B) = 2.5 / 1.5
    g = games_of([("A", "B", 1.0), ("B", "A", 0.0), ("A", "B", 0.5), ("A", "B", 0.0)])
    bt = bradley_terry(g)
    assert bt["A"] - bt["B"] == pytest.approx(400 * math.log10(2.5 / 1.5), abs=1e-6)
    assert bt.mean() == pytest.approx(1000.0)


def mm_bradley_terry(games, iters=5000):
    """Hunter (2004): pi_i <- W_i / sum_j N_ij / (pi_i + pi_j), a different method from scipy's."""
    models = sorted(set(games.model_a) | set(games.model_b))
    W, N = {m: 0.0 for m in models}, {}
    for a, b, s in games[["model_a", "model_b", "score_a"]].itertuples(index=False):
        W[a], W[b] = W[a] + s, W[b] + 1 - s
        N[a, b] = N[b, a] = N.get((a, b), 0) + 1
    pi = {m: 1.0 for m in models}
    for _ in range(iters):
        pi = {i: W[i] / sum(N.get((i, j), 0) / (pi[i] + pi[j]) for j in models if j != i)
              for i in models}
        mean_log = sum(math.log(p) for p in pi.values()) / len(pi)
        pi = {m: p / math.exp(mean_log) for m, p in pi.items()}
    return pd.Series({m: 1000 + 400 * math.log10(p) for m, p in pi.items()})


def test_bradley_terry_matches_mm_iteration():
    g = random_games(5, 150, np.random.default_rng(7))
    got, want = bradley_terry(g), mm_bradley_terry(g)
    assert (got - want[got.index]).abs().max() < 1e-3


def test_win_rate_matrix_by_loop():
    g = random_games(4, 30, np.random.default_rng(2))
    pts, n = {}, {}
    for a, b, s in g[["model_a", "model_b", "score_a"]].itertuples(index=False):
        pts[a, b], pts[b, a] = pts.get((a, b), 0) + s, pts.get((b, a), 0) + 1 - s
        n[a, b] = n[b, a] = n.get((a, b), 0) + 1
    wr = win_rate_matrix(g)
    for (a, b), p in pts.items():
        assert wr.at[a, b] == pytest.approx(p / n[a, b])
    assert np.isnan(np.diag(wr.to_numpy())).all()


def test_order_consistency_by_hand():
    g = games_of([("A", "B", 1.0), ("B", "A", 1.0),   # p1: whoever is first wins
                  ("A", "B", 1.0), ("B", "A", 0.0),   # p2: A wins both orders
                  ("A", "B", 0.5), ("B", "A", 1.0)],  # p3: a tie, then B wins
                 prompts=["p1", "p1", "p2", "p2", "p3", "p3"])
    got = order_consistency(g).to_dict()
    assert got == {"first shown wins both": 1, "same winner": 1, "tie in one order only": 1}


def test_bootstrap_values_are_possible_resamples():
    # prompt x: A beats B; prompt y: B beats A. A resample is {x,x}, {y,y} or {x,y}.
    g = games_of([("A", "B", 1.0), ("A", "B", 0.0)], prompts=["x", "y"])
    rows = {"xx": [("A", "B", 1.0)] * 2, "yy": [("A", "B", 0.0)] * 2,
            "xy": [("A", "B", 1.0), ("A", "B", 0.0)], "yx": [("A", "B", 0.0), ("A", "B", 1.0)]}
    possible = [plain_elo(v)["A"] for v in rows.values()]  # one ordering per replicate
    boot = elo_bootstrap(g, replicates=40, orderings=1, seed=0)
    assert boot.shape == (40, 2)
    for a in boot["A"]:
        assert min(abs(a - p) for p in possible) < 1e-9
    assert boot["A"].round(6).nunique() >= 3  # the prompts really are resampled


def test_separability():
    s = pd.DataFrame({"x": [3.0, 2.0, 5.0, 1.0], "y": [1.0, 1.0, 1.0, 2.0]})
    p = separability(s)
    assert p.at["x", "y"] == 0.75 and p.at["y", "x"] == 0.25 and np.isnan(p.at["x", "x"])


@pytest.mark.parametrize("games, match", [
    (pd.DataFrame(columns=["model_a", "model_b", "score_a"]), "empty"),
    (games_of([("A", "A", 1.0)]), "cannot play itself"),
    (games_of([("A", "B", 0.3)]), "score_a must be 0, 0.5 or 1"),
    (pd.DataFrame({"model_a": ["A"], "model_b": ["B"]}), "missing"),
])
def test_bad_games(games, match):
    with pytest.raises(ValueError, match=match):
        elo_tournament(games, orderings=2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="benchmark must be one of"):
        load_paper_verdicts("mt-bench")
    g = games_of([("A", "B", 1.0)])
    with pytest.raises(ValueError, match="orderings"):
        elo_tournament(g, orderings=0)
    with pytest.raises(ValueError, match="replicates"):
        elo_bootstrap(g, replicates=0)


def raw_rows(name):
    with gzip.open(DATA / name, "rt", newline="") as f:
        return list(csv.DictReader(f))


def test_verdicts_against_the_csv():
    raw = [r for r in raw_rows("gpt4_pairwise_verdicts.csv.gz") if r["benchmark"] == "vicuna"]
    games = load_paper_verdicts("vicuna")
    bad = sum(r["verdict"] == "-1" for r in raw)
    assert games.attrs["unparsable"] == bad and len(games) + bad == len(raw) == 80 * 56
    assert set(games.model_a) | set(games.model_b) == set(MODELS)
    kept = [r for r in raw if r["verdict"] != "-1"]
    score = {"1": 1.0, "2": 0.0, "3": 0.5}
    assert list(games.score_a) == [score[r["verdict"]] for r in kept]
    name = {f"{s}b-guanaco-vicuna-generations-topp0.9-temp0.7": f"guanaco-{n}b"
            for s, n in (("7", "7"), ("13", "13"), ("30", "33"), ("65", "65"))}
    name.update({"answer-gpt4": "gpt-4", "answer-gpt35": "chatgpt", "answer-bard": "bard",
                 "answer-vicuna-13b": "vicuna-13b"})
    assert list(games.model_a) == [name[r["model_a"]] for r in kept]
    assert list(games.model_b) == [name[r["model_b"]] for r in kept]
    assert set(load_paper_verdicts("oa").model_a) == set(MODELS) - {"bard"}


def test_percent_of_chatgpt_reproduces_the_paper():
    """The paper's 99.3% (65B) and 97.8% (33B), from the CSV with the order the review files'
    answer ids give (for the repo's own generations, the reverse of the file name's order)."""
    raw = raw_rows("gpt4_relative_scores.csv.gz")
    for size, paper in (("65b", 99.3), ("30b", 97.8)):
        rows = [r for r in raw if f"{size}-guanaco" in r["model_a"] + r["model_b"]
                and float(r["score_a"]) >= 0]
        # the score pair is in the reverse of the file name's order, in both files
        first = [r["model_a"].startswith(size) for r in rows]
        mine = sum(float(r["score_b"] if f else r["score_a"]) for r, f in zip(rows, first))
        chat = sum(float(r["score_a"] if f else r["score_b"]) for r, f in zip(rows, first))
        assert round(100 * mine / chat, 1) == paper
    pct = percent_of_chatgpt(load_relative_scores())
    assert round(pct.at["guanaco-65b", "percent"], 1) == 99.3
    assert round(pct.at["guanaco-33b", "percent"], 1) == 97.8


def test_checks_pass_an_independent_answer_and_fail_a_wrong_one(capsys):
    """The checks pass answers written here and refuse the package's own functions."""
    def update(ra, rb, score_a, k):
        delta = k * (score_a - 1 / (1 + 10 ** ((rb - ra) / 400)))
        return ra + delta, rb - delta

    def widths(games, k):
        r = elo_tournament(games, k=k, orderings=1_000, seed=0)
        return r["p97.5"] - r["p2.5"]
    check_elo_update(update, seed=0)
    with pytest.raises(ExerciseFailed, match="case 0"):
        check_elo_update(lambda ra, rb, s, k: (ra + k * s, rb - k * s), seed=0)
    assert "ex-09-1: FAIL" in capsys.readouterr().out
    check_bradley_terry(mm_bradley_terry, n=3, seed=0)
    with pytest.raises(ExerciseFailed, match="expected"):
        check_bradley_terry(lambda g: mm_bradley_terry(g) * 1.01, n=3, seed=0)
    check_spread(lambda g, k: float(widths(g, k).mean()), n=2, seed=0)
    with pytest.raises(ExerciseFailed):   # the width of one model, not the mean over models
        check_spread(lambda g, k: float(widths(g, k).iloc[0]), n=2, seed=0)
    for check_fn, own in ((check_elo_update, elo_update), (check_win_rate_matrix, win_rate_matrix),
                          (check_bradley_terry, bradley_terry), (check_spread, spread)):
        with pytest.raises(ExerciseFailed, match="calls the reference"):
            check_fn(own, n=1, seed=0)


def test_generation_command_writes_the_reference_layout(tmp_path):
    from qlora_mini.studies.elo_generate import main
    out = main(["--output", str(tmp_path / "gen.jsonl"), "--limit", "2",
                "--max-new-tokens", "4"])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    questions = [json.loads(l) for l in (DATA / "vicuna_questions.jsonl").open()][:2]
    assert [l["question_id"] for l in lines] == [q["question_id"] for q in questions]
    for line, q in zip(lines, questions):
        assert set(line) == {"question_id", "text", "category", "prompt", "generation",
                             "generation_truncated"}
        assert line["prompt"] == f"### Human: {q['text']} ### Assistant:"
    assert not list(tmp_path.glob("*.part"))
    with pytest.raises(SystemExit):
        main(["--limit", "0"])


@pytest.mark.processes
@pytest.mark.parametrize("args, says", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--model", "/nonexistent"], "/nonexistent: no such folder"),
    (["--adapter", "/nonexistent"], "/nonexistent"),
    (["--output", "/proc/nope/gen.jsonl"], "cannot create its folder")])
def test_generation_command_refuses_bad_arguments_in_one_line(args, says):
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "qlora_mini.studies.elo_generate", *args],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip() == run.stderr.strip().splitlines()[-1]
    assert run.stderr.startswith("error: ") and says in run.stderr


def test_generation_keeps_the_finished_answers_when_interrupted(tmp_path, monkeypatch):
    """Ctrl-C during the third answer: the file holds the first two, whole; status 130."""
    from qlora_mini.studies import elo_generate
    calls = []

    def answer(model, tokenizer, text, max_new_tokens):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return f"answer {len(calls)}"

    monkeypatch.setattr(elo_generate, "generate", answer)
    out = tmp_path / "gen.jsonl"
    with pytest.raises(SystemExit) as stop:
        elo_generate.main(["--output", str(out), "--max-new-tokens", "2"])
    assert stop.value.code == 130
    assert [json.loads(l)["generation"] for l in out.read_text().splitlines()] == \
        ["answer 1", "answer 2"]
