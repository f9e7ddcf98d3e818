"""Milliseconds per training step (forward, backward, AdamW) of a 2-layer model on the CPU's code path, one thread,
batch 64, random tokens of a vocabulary of 256: the gated-DeltaNet memory or MoM (top-2, shared memory), with the
torch path's chunk length set. What the quickstart probes of README.md measured.

    python docs/results/quickstart/cpu_step.py --width 16 --seq-len 128 --memories 4 --chunk 16
    (--memories 0: one gated-DeltaNet memory)
"""

import argparse
import time

import torch

import kernels.gated_deltanet.naive as gated_deltanet_naive
from models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--memories", type=int, required=True, help="MoM's memory count; 0: one memory, no router")
    parser.add_argument("--chunk", type=int, default=64, help="the torch path's chunk length (its default: 64)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    chunk_op = gated_deltanet_naive.naive_chunk
    gated_deltanet_naive.naive_chunk = lambda *a, chunk_size=None, **k: chunk_op(*a, chunk_size=args.chunk, **k)
    routed = args.memories > 0
    options = {"rule": "gated_deltanet", "num_memories": args.memories, "top_k": min(2, args.memories),
               "shared_memory": True} if routed else {}
    model = build_model(vocab_size=256, max_seq_len=args.seq_len, mixer="mom" if routed else "gated_deltanet",
                        d_model=args.width, n_layers=2, backend="torch", mixer_options=options)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    tokens = torch.randint(0, 256, (64, args.seq_len))

    def step():
        model(tokens).logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(3):  # the fastest of three timings of five steps: the least disturbed by other work
        start = time.perf_counter()
        for _ in range(5):
            step()
        best = min(best, (time.perf_counter() - start) / 5)
    label = f"MoM M{args.memories} top-2 + shared" if routed else "one gated-DeltaNet memory"
    print(f"width {args.width}, L {args.seq_len}, {label}, chunks of {args.chunk}: {best * 1e3:.1f} ms a step")


if __name__ == "__main__":
    main()
