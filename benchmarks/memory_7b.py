"""GPU memory of the 7B spec, per GPU and by component, computed from the spec; beside verl's settings.

    .venv/bin/python benchmarks/memory_7b.py [--spec examples/deepeyesv2-7b.yaml] [--gpu-gb 80]

The model is the spec's Qwen2.5-VL-7B-Instruct. Its dimensions are those of its published config.json
(the machine that runs this has no internet, so they are written down here). Every other figure comes
from the spec: nodes and GPUs, ZeRO stage and offload, precision, gradient checkpointing, micro-batch and
sequence lengths, and the colocated vLLM engine's memory share. The RL job has two phases on each GPU:

- **rollout**: the colocated vLLM engine holds its weights and its KV cache; the trainer's ZeRO-3 shards
  (parameters, gradients, optimizer states) stay where they are;
- **train**: the engine sleeps (vLLM's sleep mode, level 1: weights copied to host memory, KV cache
  freed), and the trainer adds its gathered layers, activations and the log-probability chunk.

The row that matters is the larger phase, which must leave 10 % of the GPU free. Each lever shows what it
saves by the rows that drop out without it (`--without`). Gradient checkpointing (the spec's
`gradient_checkpointing`) and the chunked log-probabilities are in the trainers; the engine's sleep mode
is not yet, so `--without "sleep mode"` is the RL job as it runs today. The formulas are the usual ones:

- mixed-precision AdamW: 2 bytes per parameter for the bf16 weights, 2 for their gradients, and 12 for the
  fp32 master weights and two moments, each divided by the data-parallel size under ZeRO-3. ZeRO-Offload
  moves the 12 bytes to host memory;
- ZeRO-3 gathers layers on the fly, up to `stage3_max_live_parameters` (DeepSpeed's default: 1e9) at once;
- activations per decoder layer and token, in bf16: the saved inputs and outputs of the norms, q/k/v, the
  attention output and projection, and the MLP's gate, up, activation and product. With flash-style
  attention nothing grows as T^2. Checkpointing keeps one hidden state per layer and token, plus one
  layer recomputed at a time;
- logits: the bf16 projection, its fp32 copy and the fp32 log-softmax, for the rows that exist at once.
  The RL trainer computes them in chunks (`trainers.rl.grpo.LOGIT_ROWS`); the SFT trainer's Hugging Face
  loss takes whole sequences;
- vLLM: a full bf16 copy of the weights per engine (tensor parallel 1: one engine per GPU), and the rest of
  its memory share as KV cache (K and V per layer and KV head).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argus.specfile import load_spec  # noqa: E402
from trainers.rl.grpo import LOGIT_ROWS  # noqa: E402

GB = 1e9
CUDA_CONTEXT_GB = 0.6  # per process: the trainer's and the engine's (measured figures are 0.5-0.8)
ZERO3_MAX_LIVE = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters


@dataclass(frozen=True)
class Arch:
    """A decoder-only language model with a vision tower, as far as memory goes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_out: int
    merge: int  # patches merged into one vision token (2 x 2)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def llm_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = h * h + h + 2 * (h * kv + kv) + h * h
        mlp = 3 * h * self.intermediate
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return self.layers * (attn + mlp + 2 * h) + embeddings + h

    @property
    def vision_params(self) -> int:
        v = self.vision_hidden
        block = 4 * v * v + 3 * v * self.vision_intermediate + 2 * v
        merged = v * self.merge
        return self.vision_depth * block + merged * merged + merged * self.vision_out + 14 * 14 * 3 * 2 * v

    @property
    def params(self) -> int:
        return self.llm_params + self.vision_params

    def activation_bytes_per_token(self) -> int:
        """Saved for backward by one decoder layer, per token, in bf16."""
        h, kv, f = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        attention = 2 * h + h + 2 * kv + h + h  # norm in/out, q, k and v, attention output, o_proj output
        mlp = h + 4 * f  # norm, gate, up, activation, product
        return 2 * (attention + mlp)

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


# Qwen/Qwen2.5-VL-7B-Instruct, config.json (text: hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, vocab_size, tie_word_embeddings; vision_config: hidden_size,
# intermediate_size, depth, out_hidden_size, spatial_merge_size 2).
QWEN25_VL_7B = Arch(3584, 18944, 28, 28, 4, 152064, False, 1280, 3420, 32, 3584, 4)
ARCHS = {"Qwen/Qwen2.5-VL-7B-Instruct": QWEN25_VL_7B}

# verl's examples/grpo_trainer/run_qwen2_5_vl-7b.sh (geo3k, 1 node x 8 GPUs), the settings that decide memory.
VERL = {
    "training engine": "FSDP, full shard over 8 GPUs",
    "parameter / optimizer offload": "off / off (reference model: parameters offloaded)",
    "gradient checkpointing": "on",
    "sequence": "prompt 1,024 + response 2,048, padding removed",
    "micro-batch (update / log-prob)": "10 / 20 sequences per GPU",
    "rollout": "vLLM, tensor parallel 2, gpu_memory_utilization 0.6, chunked prefill off",
    "rollouts per prompt": "5",
    "KL loss": "on (0.01, low_var_kl): a reference model",
}


def rows(arch: Arch, spec: object, without: set[str]) -> dict[str, dict[str, float]]:
    """GB per GPU by component for SFT and RL's two phases."""
    from argus.config import PipelineSpec

    assert isinstance(spec, PipelineSpec)
    out: dict[str, dict[str, float]] = {}
    for name, job in (("SFT", spec.sft), ("RL", spec.rl)):
        world = job.world_size
        zero3 = job.deepspeed.zero_stage == 3
        shards = world if zero3 else 1
        p = arch.params
        ckpt = job.gradient_checkpointing and "checkpointing" not in without
        if name == "SFT":
            tokens = spec.sft.max_seq_len * spec.sft.micro_batch_size
            logit_rows = tokens
        else:
            tokens = spec.rl.vllm.max_model_len * spec.rl.micro_batch_size
            logit_rows = tokens if "chunked log-probs" in without else min(LOGIT_ROWS, tokens)
        per_layer = arch.activation_bytes_per_token() * tokens
        layer_inputs = arch.layers * tokens * arch.hidden * 2
        train = {
            "weights (bf16, sharded)": 2 * p / shards,
            "gradients (bf16, sharded)": 2 * p / shards,
            "optimizer states (fp32 master, m, v)": 0.0 if job.deepspeed.offload_optimizer else 12 * p / shards,
            "gathered layers (ZeRO-3)": 2 * min(ZERO3_MAX_LIVE, p) if zero3 else 0.0,
            "activations": (layer_inputs + per_layer) if ckpt else arch.layers * per_layer,
            "logits": logit_rows * arch.vocab * (2 + 4 + 4),
            "CUDA context": CUDA_CONTEXT_GB * GB,
        }
        out[f"{name} train"] = {k: v / GB for k, v in train.items()}
        if name == "RL":
            share = spec.rl.vllm.memory_fraction
            budget = share * GPU_GB * GB
            weights = 2 * p
            resident = {k: v for k, v in train.items() if "weights" in k or "gradients" in k or "optimizer" in k}
            rollout = {
                **resident,
                "CUDA context": 2 * CUDA_CONTEXT_GB * GB,
                "vLLM weights (bf16, whole)": weights,
                "vLLM KV cache": max(budget - weights, 0.0),
            }
            out["RL rollout"] = {k: v / GB for k, v in rollout.items()}
            if "sleep mode" in without:
                out["RL train"]["vLLM weights (bf16, whole)"] = weights / GB
                out["RL train"]["vLLM KV cache"] = max(budget - weights, 0.0) / GB
                out["RL train"]["CUDA context"] += CUDA_CONTEXT_GB
            else:
                out["RL train"]["vLLM asleep (CUDA context)"] = CUDA_CONTEXT_GB
    return out


GPU_GB = 80.0


def main() -> None:
    global GPU_GB
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "deepeyesv2-7b.yaml")
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU (H100: 80)")
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=["checkpointing", "chunked log-probs", "sleep mode"],
        help="leave a lever out, to see what it saves (repeatable)",
    )
    args = parser.parse_args()
    GPU_GB = args.gpu_gb
    spec = load_spec(args.spec)
    model = spec.model.base.uri.removeprefix("hf://") if spec.model.base.uri else ""
    arch = ARCHS.get(model)
    if arch is None:
        raise SystemExit(f"{args.spec}: model.base.uri: no dimensions known for {model!r} (known: {', '.join(ARCHS)})")
    console = Console(width=160)
    table_rows = rows(arch, spec, set(args.without))
    phases = list(table_rows)
    components = list(dict.fromkeys(k for phase in table_rows.values() for k in phase))
    title = (
        f"{args.spec.name}: {model} ({arch.params / 1e9:.2f} B parameters), GB per GPU, "
        f"{spec.rl.nodes} x {spec.rl.nproc_per_node} GPUs of {GPU_GB:.0f} GB"
        + (f", without {', '.join(args.without)}" if args.without else "")
    )
    table = Table(title=title)
    table.add_column("component")
    for phase in phases:
        table.add_column(phase, justify="right")
    for component in components:
        table.add_row(
            component, *(f"{table_rows[p][component]:.1f}" if component in table_rows[p] else "—" for p in phases)
        )
    limit = 0.9 * GPU_GB
    totals = {p: sum(table_rows[p].values()) for p in phases}
    table.add_row("total", *(f"[bold]{totals[p]:.1f}[/]" for p in phases))
    table.add_row(
        f"fits with 10 % headroom (≤ {limit:.0f})",
        *(
            ("yes" if totals[p] <= limit else "[red]no[/]") + f" ({100 * (1 - totals[p] / GPU_GB):.0f} % free)"
            for p in phases
        ),
    )
    console.print(table)

    rl, sft = spec.rl, spec.sft
    ours = {
        "training engine": f"DeepSpeed ZeRO-{rl.deepspeed.zero_stage}, sharded over {rl.world_size} GPUs",
        "parameter / optimizer offload": f"{'on' if rl.deepspeed.offload_params else 'off'} / "
        f"{'on' if rl.deepspeed.offload_optimizer else 'off'} (SFT: optimizer "
        f"{'on' if sft.deepspeed.offload_optimizer else 'off'}); no reference model (kl_coef {rl.kl_coef})",
        "gradient checkpointing": "on" if rl.gradient_checkpointing else "off",
        "sequence": f"up to {rl.vllm.max_model_len:,} tokens (response {rl.max_response_tokens:,}, "
        f"{rl.max_turns} turns)",
        "micro-batch (update / log-prob)": f"{rl.micro_batch_size} / {rl.micro_batch_size} episodes per GPU, "
        f"log-probs in chunks of {LOGIT_ROWS:,} positions",
        "rollout": f"vLLM, tensor parallel 1 (one engine per GPU), memory share {rl.vllm.memory_fraction}, "
        "asleep while training",
        "rollouts per prompt": str(rl.rollouts_per_prompt),
        "KL loss": "off (DeepEyesV2)",
    }
    why = {
        "training engine": "the same sharding; Argus trains with DeepSpeed everywhere",
        "sequence": "DeepEyesV2's multi-turn episodes run 7x longer than geo3k's answers",
        "micro-batch (update / log-prob)": "one episode of up to 20K tokens is close to verl's 10 of up to 3K",
        "rollout": "TP 1 keeps a whole engine per rank: no rank waits on another's turn; sleep frees it",
        "rollouts per prompt": "DeepEyesV2's group size",
        "KL loss": "DeepEyesV2 trains without it, which also saves a model copy",
        "parameter / optimizer offload": "RL's optimizer stays on the GPU: it fits, and host Adam would "
        "double a short RL update",
    }
    compare = Table(title="Beside verl's Qwen2.5-VL-7B GRPO example (examples/grpo_trainer/run_qwen2_5_vl-7b.sh)")
    for col in ("setting", "verl", "Argus 7B spec", "why ours differs"):
        compare.add_column(col)
    for key, theirs in VERL.items():
        compare.add_row(key, theirs, ours[key], why.get(key, ""))
    console.print(compare)


if __name__ == "__main__":
    main()
