"""Benchmarks, reported as ratios against a baseline measured in the same process.

    python -m pipeline.bench data [--rows 100000] [--num-proc 1]
    python -m pipeline.bench stream [--rows 1000000] [--num-proc 1]
    python -m pipeline.bench ppo --model-dir DIR [--batch 16 --response-length 48 --epochs 2 --minibatches 2 --iters K]
    python -m pipeline.bench compare OURS.json PEER.json
    python -m pipeline.bench estimators --model-dir DIR [--generations 4 ...]

``data``: the data stage's throughput (rows/s) next to the raw fast tokenizer's on the same dialogues. The raw
baseline is one batched Rust-tokenizer call on the rendered texts per 1000 dialogues and does nothing else (the
slower transformers ``tokenizer(texts)`` wrapper is reported beside it); the stage
converts rows to Gemma turns, checks roles and control tokens, tokenizes per turn through ``datasets.map``, builds
loss masks and applies the length policy. A third figure adds reading JSONL and writing Parquet (end to end).
Each is run ``--repeats`` times, interleaved, and the best time of each is reported.
Goal: the stage at least 0.8x as fast as the raw tokenizer with ``--num-proc`` set to the machine's cores (the raw
tokenizer's batch call uses every core itself).

``ppo``: median seconds per PPO iteration (after the first) and peak RSS, printed as one JSON line of the same shape
as the peer baseline's (TRL 1.12's PPOTrainer, ../shared/peer/trl112_ppo.py, run in its own venv on the same model
directory); ``compare`` turns the two lines into ratios. ``make bench`` does all of it.

``estimators``: the critic-free estimators (rloo, grpo with ``--generations`` samples per prompt) against GAE PPO at
the same batch and response length, each ``bench ppo`` in its own process (peak RSS is per process): seconds per
iteration, peak RSS, and the training state measured from the tensors themselves (weights of every model,
gradients, Adam moments), as ratios to GAE's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def bench_data(rows: int, num_proc: int, repeats: int = 3) -> dict:
    import datasets

    from data_prep.encode import Rejects, encode_records, length_policy, read_dataset
    from data_prep.formats import sft_dialogue
    from data_prep.gemma_format import GemmaEncoder, render
    from data_prep.tiny_ko import DATA_DIR
    from pipeline.core.config import DatasetSpec, ModelConfig
    from pipeline.core.loading import load_tokenizer

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(ModelConfig(name_or_path="embedded:tiny-gemma-ko"))
    with open(DATA_DIR / "sft.jsonl", encoding="utf-8") as fh:
        base = [json.loads(line) for line in fh]
    # Distinct dialogues: a row number in the last user turn defeats any cache keyed on whole texts.
    dialogues = []
    for i in range(rows):
        msgs = [dict(m) for m in base[i % len(base)]["messages"]]
        msgs[-2]["content"] = f"{msgs[-2]['content']} ({i})"
        dialogues.append(msgs)
    texts = [render(d) for d in dialogues]

    encoder = GemmaEncoder(tokenizer)
    backend = tokenizer.backend_tokenizer
    n_tokens = 0

    def raw() -> None:  # the fastest raw path of the same tokenizer: the Rust backend's batch call
        nonlocal n_tokens
        n_tokens = 0
        for i in range(0, rows, 1000):
            batch = backend.encode_batch_fast(texts[i : i + 1000], add_special_tokens=False)
            n_tokens += sum(len(e.ids) for e in batch)

    def wrapper() -> None:  # the transformers call most code uses, for reference
        for i in range(0, rows, 1000):
            tokenizer(texts[i : i + 1000], add_special_tokens=False)

    def converted():  # rows -> checked Gemma turns, lazily, as the stage reads them
        for i, d in enumerate(dialogues):
            turns = sft_dialogue("messages", {"messages": d})
            encoder.check_turns(turns)
            yield f"row {i}", turns

    def stage() -> None:  # rows in memory -> turns, checks, ids, masks, length policy
        ds = encode_records("sft", converted(), encoder, num_proc)
        ds = length_policy("sft", ds, 1 << 20, "max_length", "drop", Rejects("error"))
        assert len(ds) == rows

    tmp = tempfile.TemporaryDirectory()
    src = Path(tmp.name) / "sft.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for d in dialogues:
            fh.write(json.dumps({"messages": d}, ensure_ascii=False) + "\n")

    def end_to_end() -> None:  # plus reading the JSONL file and writing Parquet
        recs, _ = read_dataset("sft", DatasetSpec(path=str(src)), [src], encoder, Rejects("error"), [], "0")
        ds = encode_records("sft", recs, encoder, num_proc)
        ds = length_policy("sft", ds, 1 << 20, "max_length", "drop", Rejects("error"))
        ds.to_parquet(str(Path(tmp.name) / "out.parquet"))

    # Interleaved repeats, best of each: the machine's noise hits every contender alike.
    best = {f.__name__: float("inf") for f in (raw, wrapper, stage, end_to_end)}
    for _ in range(repeats):
        for f in (raw, wrapper, stage, end_to_end):
            t0 = time.perf_counter()
            f()
            best[f.__name__] = min(best[f.__name__], time.perf_counter() - t0)
    tmp.cleanup()
    raw_s, wrapper_s, stage_s, e2e_s = best["raw"], best["wrapper"], best["stage"], best["end_to_end"]

    return {
        "bench": "data",
        "rows": rows,
        "tokens": n_tokens,
        "num_proc": num_proc,
        "repeats": repeats,
        "raw_tokenizer_rows_per_s": round(rows / raw_s),
        "transformers_wrapper_rows_per_s": round(rows / wrapper_s),
        "stage_rows_per_s": round(rows / stage_s),
        "stage_end_to_end_rows_per_s": round(rows / e2e_s),
        "ratio_stage_vs_raw": round(raw_s / stage_s, 3),
        "ratio_end_to_end_vs_raw": round(raw_s / e2e_s, 3),
    }


def bench_stream(rows: int, num_proc: int) -> dict:
    """Peak RSS of the data stage on a generated JSONL file read with ``streaming: true``, at ``rows`` and at a tenth
    of them, each in its own process: a stage whose memory is bounded peaks alike at both sizes (ratio near 1),
    one that holds every row grows about tenfold. The in-memory build of the smaller file is the reference."""
    import subprocess
    import sys

    import yaml

    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)

    def write(n: int) -> Path:
        path = root / f"sft_{n}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(n):
                q, a = f"질문 {i}번: 한국의 수도는 어디인가요?", f"답 {i}번: 서울입니다. 감사합니다."
                fh.write(
                    json.dumps(
                        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        return path

    def run(n: int, streaming: bool) -> tuple[int, float]:
        spec = {"path": str(write(n)), "streaming": streaming}
        recipe = {
            "run": {"name": f"s{n}{streaming}", "output_dir": str(root / "runs")},
            "model": {"name_or_path": "embedded:tiny-gemma-ko"},
            "data": {"sft": {"train": [spec]}, "num_proc": num_proc},
        }
        path = root / f"r{n}{streaming}.yaml"
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
        code = (
            "import resource, sys\nfrom pipeline.data import main\nrc = main(['--recipe', sys.argv[1]])\n"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\nsys.exit(rc)"
        )
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - t0
        line = [x for x in out.stdout.splitlines() if x.startswith("MAXRSS")][-1].split()
        return max(int(line[1]), int(line[2])) // 1024, seconds  # MB (ru_maxrss is in kB on Linux)

    small, large = max(1, rows // 10), rows
    mem_small, _ = run(small, False)
    st_small, _ = run(small, True)
    st_large, secs = run(large, True)
    tmp.cleanup()
    return {
        "bench": "stream",
        "rows": large,
        "num_proc": num_proc,
        "in_memory_peak_rss_mb_at_tenth": mem_small,
        "streaming_peak_rss_mb_at_tenth": st_small,
        "streaming_peak_rss_mb": st_large,
        "streaming_seconds": round(secs, 1),
        "ratio_streaming_full_vs_tenth": round(st_large / st_small, 3),
    }


BENCH_PROMPTS = [
    "머신러닝과 딥러닝의 차이는?",
    "하늘은 왜 파란가요?",
    "김치찌개 끓이는 법을 알려 주세요.",
    "서울의 인구는?",
    "What is RLHF?",
    "한글은 누가 만들었나요?",
    "파이썬에서 리스트를 뒤집는 방법은?",
    "커피의 장단점은?",
]


PPO_PHASES = ("ppo/sample", "ppo/values", "ppo/policy_and_values", "ppo/reference", "ppo/reward", "ppo/train")
PEER_PHASES = {"batch_generation": "ppo/sample", "forward": "ppo/reference", "get_reward": "ppo/values_and_reward"}
PEER_LABELS = {*PEER_PHASES.values(), "ppo/train_forward"}


def _phase_of(op, labels) -> str | None:
    """The label an operator runs under (``unlabelled`` when none), or None when it runs inside another operator
    (it is counted with that one)."""
    parent = op.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return None
        if parent.name in labels:
            return parent.name
        parent = parent.cpu_parent
    return "unlabelled"


def phase_breakdown(events, vocab: int, labels) -> dict:
    """Seconds per labelled phase of a torch.profiler trace (one iteration), and the part of each spent in
    operators that touch a vocabulary-sized dimension (``head_s``): the output head, its log-softmax and their
    backward, and in training also the embedding's dense gradient and the optimizer's update of those rows.
    Operators under no label are summed as ``unlabelled`` (for the peer: its training epochs)."""
    out: dict[str, dict[str, float]] = {"unlabelled": {"s": 0.0, "head_s": 0.0}}
    for ev in events:
        if ev.name in labels:
            out.setdefault(ev.name, {"s": 0.0, "head_s": 0.0})["s"] += ev.cpu_time_total / 1e6
    for op in events:
        phase = _phase_of(op, labels) if op.name.startswith("aten::") else None
        if phase is None:
            continue
        seconds = op.cpu_time_total / 1e6
        if phase == "unlabelled":
            out[phase]["s"] += seconds
        if op.name != "aten::embedding" and any(vocab in s for s in op.input_shapes if isinstance(s, list)):
            out[phase]["head_s"] += seconds  # a lookup reads a few rows; its dense backward does count
    return {k: {kk: round(vv, 6) for kk, vv in v.items()} for k, v in out.items()}  # any operator takes >1 us


def bench_ppo(
    model_dir: str,
    batch: int,
    response_length: int,
    epochs: int,
    minibatches: int,
    iters: int,
    overrides: dict | None = None,
    profile: bool = False,
) -> dict:
    """K PPO iterations of our loop on the causal-LM checkpoint in ``model_dir``: policy and reference from it,
    reward and value models as one-output sequence classifiers from it; fixed prompts; full response length; no
    gradient checkpointing; fp32 on CPU; ``overrides``: other PPOConfig settings (their defaults otherwise). Same
    shape of output as the peer's script. ``profile``: one more iteration under torch.profiler, broken down by phase
    (not counted in the timing)."""
    import resource
    import statistics

    import torch
    from accelerate import Accelerator, PartialState
    from torch.profiler import ProfilerActivity, record_function
    from transformers import AutoTokenizer

    from data_prep.gemma_format import GemmaEncoder
    from pipeline.core.batching import batch_sizes
    from pipeline.core.config import LaunchConfig, ModelConfig, PPOConfig, Recipe, RunConfig
    from pipeline.core.heads import vocabulary_size
    from pipeline.core.ppo_step import StepCounter, rollout, train_on_rollout
    from pipeline.ppo import build_setup

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = GemmaEncoder(tok)
    ids = [enc.encode([{"role": "user", "content": p}], add_generation_prompt=True).input_ids for p in BENCH_PROMPTS]
    runs = iters + 1 + int(profile)
    cfg = PPOConfig(
        per_device_train_batch_size=batch // minibatches,
        gradient_accumulation_steps=minibatches,
        num_mini_batches=minibatches,
        num_ppo_epochs=epochs,
        response_length=response_length,
        temperature=0.7,
        total_episodes=batch * runs,
        local_rollout_forward_batch_size=64,
        **(overrides or {}),
    )
    recipe = Recipe(
        run=RunConfig(name="bench"), model=ModelConfig(name_or_path=model_dir), ppo=cfg, launch=LaunchConfig()
    )
    sizes = batch_sizes(
        cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, 1, minibatches, cfg.total_episodes, epochs
    )
    PartialState(cpu=not torch.cuda.is_available())
    acc = Accelerator(gradient_accumulation_steps=sizes.micro_per_mini)
    value_dir = Path(model_dir) if cfg.estimator == "gae" else None  # critic-free: no value model
    s, scheduler = build_setup(recipe, acc, Path(model_dir), Path(model_dir), value_dir, tok, runs)
    s.stop_ids = []  # the full response length every time, as the peer benchmark samples
    counter = StepCounter()
    k = cfg.num_generations

    def iteration(it: int) -> None:  # batch // k prompts, each k times in consecutive rows
        prompts = [ids[(it * (batch // k) + j) % len(ids)] for j in range(batch // k) for _ in range(k)]
        s.model.eval()
        ro = rollout(s, prompts, cfg.kl_coef)
        s.model.train()
        with record_function("ppo/train"):
            train_on_rollout(s, ro, sizes, torch.Generator().manual_seed(it), counter, f"iteration {it}", cfg.kl_coef)
        scheduler.step()

    stamps = [time.perf_counter()]
    for it in range(iters + 1):
        iteration(it)
        stamps.append(time.perf_counter())
    per_iter = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # the first iteration is warm-up
    out = {
        "train_state_mb": training_state_bytes(s) / 2**20,
        "impl": "gemma-rlhf",
        "per_iter_s": statistics.median(per_iter),
        "iters": len(per_iter),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batch": batch,
        "response_length": response_length,
        "epochs": epochs,
        "minibatches": minibatches,
        "optimizer_steps": counter.steps,
        "settings": {
            "estimator": cfg.estimator,
            "num_generations": k,
            "rollout_logprobs": "sampler" if s.sampler_logprobs else "forward",
            **{k: getattr(cfg, k) for k in ("frozen_precision", "logits_memory_mb")},
        },
    }
    if profile:
        with torch.profiler.profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            iteration(iters + 1)
        out["profile"] = phase_breakdown(prof.events(), vocabulary_size(s.unwrapped.policy), PPO_PHASES)
    return out


def training_state_bytes(s) -> int:
    """Bytes of the weights of every model (policy, value, reference, reward), the gradients of the trained ones
    and the optimizer's state, counted from the tensors (each once)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for m in (s.model, s.ref, s.reward):
        for p in m.parameters() if m is not None else ():
            add(p)
            if p.requires_grad:  # its gradient exists at every optimizer step
                total += p.numel() * p.element_size()
    for state in s.optimizer.state.values():
        for t in state.values():
            add(t)
    return total


def compare_estimators(model_dir: str, args: list[str], generations: int) -> dict:
    """GAE, RLOO and GRPO each in its own ``bench ppo`` process at the same batch; ratios to GAE."""
    import subprocess
    import sys

    def one(*settings: str) -> dict:
        sets = [x for kv in settings for x in ("--set", kv)]
        cmd = [sys.executable, "-m", "pipeline.bench", "ppo", "--model-dir", model_dir, *args, *sets]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise SystemExit(f"bench ppo {' '.join(settings)} failed:\n{res.stderr[-3000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    gae = one("estimator=gae")
    out: dict = {"bench": "estimators", "gae": gae}
    for est in ("rloo", "grpo"):
        r = one(f"estimator={est}", f"num_generations={generations}")
        out[est] = {
            **r,
            "time_ratio": round(r["per_iter_s"] / gae["per_iter_s"], 3),
            "peak_rss_ratio": round(r["peak_rss_mb"] / gae["peak_rss_mb"], 3),
            "train_state_ratio": round(r["train_state_mb"] / gae["train_state_mb"], 3),
        }
    return out


def profile_peer(script: str, argv: list[str], profiler: bool) -> None:
    """Run the peer's benchmark script (in its own venv, ``PYTHONPATH`` at this repository) with its phases timed,
    and print the breakdown of its second iteration as one JSON line: wall seconds per phase (``train`` is the rest
    of the iteration: its PPO epochs), or with ``profiler`` the torch.profiler breakdown with the head's part (the
    profiler's per-operator cost inflates the peer's many small operators, so read it as shares)."""
    import importlib.util
    import sys

    import torch
    from torch.profiler import ProfilerActivity, record_function, schedule

    from pipeline.core.heads import vocabulary_size

    spec = importlib.util.spec_from_file_location("peer_bench", script)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    import trl.experimental.ppo.ppo_trainer as trainer_module

    seconds: dict[str, float] = {}
    iterations: list[dict[str, float]] = []

    def labelled(fn, label):
        def wrapper(*a, **k):  # TRL's ``forward`` also runs the training step's policy and value forward
            name = "ppo/train_forward" if torch.is_grad_enabled() else label
            t0 = time.perf_counter()
            with record_function(name):
                out = fn(*a, **k)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    for name, label in PEER_PHASES.items():
        setattr(trainer_module, name, labelled(getattr(trainer_module, name), label))
    vocab: dict[str, int] = {}
    captured: dict = {}

    def ready(p) -> None:  # the second iteration's trace, once it is complete
        captured.setdefault("profile", phase_breakdown(p.events(), vocab["n"], PEER_LABELS))

    prof = torch.profiler.profile(
        activities=[ProfilerActivity.CPU],
        record_shapes=True,
        schedule=schedule(wait=1, warmup=0, active=1, repeat=1),
        on_trace_ready=ready,
    )
    step_end = peer.IterTimer.on_step_end
    started = [time.perf_counter()]

    def on_step_end(self, *a, **k):
        step_end(self, *a, **k)
        now = time.perf_counter()
        rollout = sum(v for key, v in seconds.items() if key != "ppo/train_forward")
        iterations.append({**seconds, "ppo/train": now - started[0] - rollout})
        seconds.clear()
        started[0] = now
        if profiler:
            prof.step()

    peer.IterTimer.on_step_end = on_step_end
    original_train = trainer_module.PPOTrainer.train

    def train(self, *a, **k):
        vocab["n"] = vocabulary_size(self.model.policy)
        started[0] = time.perf_counter()
        return original_train(self, *a, **k)

    trainer_module.PPOTrainer.train = train
    sys.argv = [script, *argv]
    if profiler:
        prof.start()
    peer.main()
    if profiler:
        prof.stop()
        print(json.dumps({"impl": "trl-1.12", **captured}))
    else:
        print(json.dumps({"impl": "trl-1.12", "seconds": {k: round(v, 3) for k, v in iterations[1].items()}}))


def chat_ready(model_dir: str, out: str) -> Path:
    """``out``: the model in ``model_dir`` (linked, not copied) with its tokenizer carrying Gemma's chat template, as
    the peer's script needs (a base model such as the embedded Gemma 3 270M ships without one)."""
    from transformers import AutoTokenizer

    from data_prep.gemma_format import install_chat_template
    from pipeline.core.rundir import GENERATION_CONFIG, MODEL_CONFIG

    src, dst = Path(model_dir).resolve(), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_CONFIG, GENERATION_CONFIG, "model.safetensors"):
        link = dst / name
        if (src / name).exists() and not link.exists():
            link.symlink_to(src / name)
    install_chat_template(AutoTokenizer.from_pretrained(src)).save_pretrained(dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    st = sub.add_parser("stream", help="data stage peak memory on a streamed file of --rows rows and a tenth of them")
    st.add_argument("--rows", type=int, default=1_000_000)
    st.add_argument("--num-proc", type=int, default=1)
    d = sub.add_parser("data", help="data stage vs raw tokenizer throughput")
    d.add_argument("--rows", type=int, default=100_000)
    d.add_argument("--num-proc", type=int, default=1)
    d.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best time of each is reported")
    pp = sub.add_parser("ppo", help="PPO iteration time and peak memory (compare with the peer's script)")
    pp.add_argument("--model-dir", required=True)
    pp.add_argument("--batch", type=int, default=16)
    pp.add_argument("--response-length", type=int, default=48)
    pp.add_argument("--epochs", type=int, default=2)
    pp.add_argument("--minibatches", type=int, default=2)
    pp.add_argument("--iters", type=int, default=4)
    pp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another ppo setting")
    pp.add_argument("--profile", action="store_true", help="one more iteration under torch.profiler, by phase")
    peer = sub.add_parser("peer-profile", help="the peer's script with its phases profiled (run in its venv)")
    peer.add_argument("--profiler", action="store_true", help="torch.profiler shares instead of wall seconds")
    peer.add_argument("script")
    peer.add_argument("args", nargs=argparse.REMAINDER)
    ready = sub.add_parser("chat-ready", help="link a model with a chat-template tokenizer (for the peer's script)")
    ready.add_argument("model_dir")
    ready.add_argument("out")
    est = sub.add_parser("estimators", help="rloo and grpo vs GAE PPO at the same batch: time and memory ratios")
    est.add_argument("--model-dir", required=True)
    est.add_argument("--generations", type=int, default=4)
    est.add_argument("args", nargs=argparse.REMAINDER, help="options of bench ppo (--batch, --iters, ...)")
    cmp = sub.add_parser("compare", help="ratios of two JSON result lines (ours, then the peer's)")
    cmp.add_argument("ours")
    cmp.add_argument("peer")
    cmp.add_argument("--goals", nargs=2, type=float, default=(0.5, 0.6), metavar=("TIME", "MEMORY"))
    a = ap.parse_args(argv)
    if a.what == "ppo":
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
        r = bench_ppo(a.model_dir, a.batch, a.response_length, a.epochs, a.minibatches, a.iters, overrides, a.profile)
        print(json.dumps(r))
        return
    if a.what == "estimators":
        r = compare_estimators(a.model_dir, [x for x in a.args if x != "--"], a.generations)
        print(json.dumps(r))
        for est in ("rloo", "grpo"):
            print(
                f"{est} (k={a.generations}) vs GAE PPO at batch {r['gae']['batch']}: {r[est]['per_iter_s']:.2f}s vs "
                f"{r['gae']['per_iter_s']:.2f}s per iteration ({r[est]['time_ratio']:.2f}x); training state "
                f"{r[est]['train_state_mb']:.0f} vs {r['gae']['train_state_mb']:.0f} MB "
                f"({r[est]['train_state_ratio']:.2f}x); peak RSS {r[est]['peak_rss_mb']:.0f} vs "
                f"{r['gae']['peak_rss_mb']:.0f} MB ({r[est]['peak_rss_ratio']:.2f}x)"
            )
        return
    if a.what == "peer-profile":
        profile_peer(a.script, [x for x in a.args if x != "--"], a.profiler)
        return
    if a.what == "chat-ready":
        print(chat_ready(a.model_dir, a.out))
        return
    if a.what == "compare":
        ours, peer = (json.loads(Path(p).read_text().strip().splitlines()[-1]) for p in (a.ours, a.peer))
        t, m = ours["per_iter_s"] / peer["per_iter_s"], ours["peak_rss_mb"] / peer["peak_rss_mb"]
        print(
            json.dumps(
                {"bench": "ppo", "time_ratio": round(t, 3), "peak_rss_ratio": round(m, 3), "ours": ours, "peer": peer}
            )
        )
        print(
            f"PPO vs {peer['impl']}: {ours['per_iter_s']:.2f}s vs {peer['per_iter_s']:.2f}s per iteration "
            f"-> {t:.2f}x time (goal <= {a.goals[0]}); peak RSS {ours['peak_rss_mb']:.0f} vs "
            f"{peer['peak_rss_mb']:.0f} MB -> {m:.2f}x (goal <= {a.goals[1]})"
        )
        return
    if a.what == "stream":
        r = bench_stream(a.rows, a.num_proc)
        print(json.dumps(r))
        print(
            f"streamed data stage: peak RSS {r['streaming_peak_rss_mb']} MB at {r['rows']} rows, "
            f"{r['streaming_peak_rss_mb_at_tenth']} MB at a tenth of them -> {r['ratio_streaming_full_vs_tenth']:.2f}x "
            f"(bounded: near 1; in memory at a tenth: {r['in_memory_peak_rss_mb_at_tenth']} MB)"
        )
        return 0
    if a.what == "data":
        r = bench_data(a.rows, a.num_proc, a.repeats)
        print(json.dumps(r))
        print(
            f"data stage: {r['stage_rows_per_s']} rows/s vs raw tokenizer {r['raw_tokenizer_rows_per_s']} rows/s "
            f"-> {r['ratio_stage_vs_raw']:.2f}x of raw with num_proc {r['num_proc']} (goal >= 0.8 at the machine's "
            "cores); end to end with JSONL read and Parquet write: "
            f"{r['ratio_end_to_end_vs_raw']:.2f}x"
        )


if __name__ == "__main__":
    main()
