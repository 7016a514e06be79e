"""How far the pinned weight updates of ``tests/test_pinned_weights.py`` move across CPU kernel sets
and thread counts, against the tolerance and against deliberate changes of the arithmetic.

    python benchmarks/pinned_spread.py                # about 2 min on 2 cores

Every run of the test's ``RUNS`` is repeated in its own process under each kernel set that torch
offers on this CPU (``ATEN_CPU_CAPABILITY`` = default, avx2, avx512) with 1, 2 and 4 intra-op
threads, and compared with the pins (``relative_distance``: ``max |f - f_pin| / max |f_pin|``
over the weight tensors' fingerprints). Then, under the machine's own kernel set, the code's
arithmetic is changed on purpose (a monkeypatch in the worker) and the same distance printed:
a pin must see those changes, so each must lie far above ``RTOL``, and the spread far below it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("default", "avx2", "avx512")
THREADS = (1, 2, 4)
# mutation -> the run it changes
MUTATIONS = {
    "fd step x 1.0001": "token-fd-forward",
    "fd step x 1.01": "token-fd-forward",
    "fd step x 2": "token-fd-forward",
    "logit-F baseline <z, p_ref> dropped": "logit-fd-central",
    "token-F logsumexp in float32": "token-exact",
}


def _mutate(name: str) -> None:
    """Changes the penalty arithmetic in this process as ``name`` says."""
    import torch

    from fishertune import penalties, penalty_grad

    if name.startswith("fd step x "):
        import test_pinned_weights

        factor = float(name.rsplit(" ", 1)[1])
        for key in list(penalties.DEFAULT_FD_STEP):
            penalties.DEFAULT_FD_STEP[key] *= factor
        for run in test_pinned_weights.RUNS.values():  # the runs give their steps
            if "penalty_fd_step" in run:
                run["penalty_fd_step"] *= factor
        return
    original = penalties.fisher_objective

    def objective(kind, logits, label_mask, targets, reference_probs=None):  # type: ignore[no-untyped-def]
        scored = logits[label_mask]
        picked = scored.gather(1, targets)
        if name.startswith("logit-F baseline") and kind == "logit":
            return picked.sum(0)
        if name.startswith("token-F logsumexp") and kind == "token":
            lse = torch.logsumexp(scored.float(), dim=-1, keepdim=True).to(scored.dtype)
            return (picked - lse).sum(0)
        return original(kind, logits, label_mask, targets, reference_probs)

    penalties.fisher_objective = objective
    penalty_grad.fisher_objective = objective


def worker(spec: dict) -> None:
    """Runs the named runs (under ``spec["mutation"]`` if any) and prints their distances to the
    pins as one JSON line."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from conftest import write_chat_file
    from test_pinned_weights import load_pins, relative_distance, weight_update

    torch.set_num_threads(spec["threads"])
    if spec.get("mutation"):
        _mutate(spec["mutation"])
    work = Path(tempfile.mkdtemp(prefix="pinned-spread-"))
    chat = write_chat_file(work / "chat.jsonl")
    out = {"capability": torch.backends.cpu.get_cpu_capability()}
    for name in spec["runs"]:
        update = weight_update(chat, work / name, name)
        out[name] = relative_distance(update, load_pins(name))
    print("RESULT " + json.dumps(out), flush=True)


def _run(spec: dict, capability: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(spec["threads"]))
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from test_pinned_weights import RTOL, RUNS

    print(f"RTOL = {RTOL:g}; relative distance of each run's update to its pin\n")
    print("| kernel set | threads | " + " | ".join(RUNS) + " |")
    print("|---|---|" + "---|" * len(RUNS))
    worst = dict.fromkeys(RUNS, 0.0)
    for capability in CAPABILITIES:
        for threads in THREADS:
            result = _run({"runs": list(RUNS), "threads": threads}, capability)
            if result["capability"].lower() != capability:
                print(f"| {capability} | - | not offered on this CPU |")
                break
            for name in RUNS:
                worst[name] = max(worst[name], result[name])
            cells = " | ".join(f"{result[name]:.1e}" for name in RUNS)
            print(f"| {capability} | {threads} | {cells} |")
    print("| **worst** | | " + " | ".join(f"**{worst[n]:.1e}**" for n in RUNS) + " |")
    print("\n| deliberate change | run | relative distance | caught (> RTOL) |")
    print("|---|---|---|---|")
    for mutation, name in MUTATIONS.items():
        result = _run({"runs": [name], "threads": 1, "mutation": mutation}, None)
        print(f"| {mutation} | {name} | {result[name]:.1e} | {result[name] > RTOL} |")


if __name__ == "__main__":
    main()
