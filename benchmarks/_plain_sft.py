"""Baseline for benchmarks/sft_bench.py: the smallest correct data-parallel loop, no DeepSpeed, no
checkpoints, no tracking. Same model, data, encoding, schedule and optimizer as the Argus trainer.

    torchrun --nproc_per_node 2 benchmarks/_plain_sft.py MODEL_DIR SFT_JSON STEPS MICRO_BATCH MAX_SEQ_LEN
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from argus.data.formats import read_sharegpt
from trainers.sft.data import Encoder, Schedule, collate


def main() -> None:
    model_dir, data, steps, micro, max_len = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        int(sys.argv[5]),
    )
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = torch.nn.parallel.DistributedDataParallel(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    )
    encoder = Encoder(tok, None, max_len)
    examples = [e for e in (encoder.encode(ex, "") for ex in read_sharegpt(data)) if e is not None]
    schedule = Schedule(len(examples), 3, world, rank, micro)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        started = time.perf_counter()
        batch = collate([examples[i] for i in schedule.micro_batch_at(step - 1)], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        tokens = torch.tensor([float(batch["attention_mask"].sum())])
        dist.all_reduce(tokens)
        if rank == 0:
            print(
                "BASELINE "
                + json.dumps(
                    {
                        "step": step,
                        "time": time.time(),
                        "tokens": int(tokens),
                        "tokens_per_s": float(tokens) / (time.perf_counter() - started),
                    }
                ),
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
