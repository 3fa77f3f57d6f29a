"""The vLLM rollout engine: token ids in, token ids and log-probabilities out, over vLLM's HTTP API, with
the trainer's weights loaded into the server after every step and checked there.

Generation is vLLM's OpenAI completions endpoint with the prompt given as token ids, one request per
episode (each with its own seed, so the episodes of a group that share their opening still differ),
at most `concurrency` in flight. The ids come back as ids (`return_tokens_as_token_ids`), each with the
log-probability it was sampled with (`logprobs: 0`; the server runs with
`--logprobs-mode processed_logprobs`, so that is the temperature-scaled distribution the trainer
recomputes). A turn stops at the end of an action (`stop_token_ids`, with the model's own EOS ignored as
the in-process engine ignores it); a stopped turn ends on its stop token, as the in-process engine's do.

Weight sync is vLLM's in-place reload (`reload_weights`, reached through the server's `/collective_rpc`,
which needs `VLLM_SERVER_DEV_MODE=1`): the trainer writes its full state dict as one safetensors file
into a fresh directory the server can read, then asks the server to load it. Every parameter is written
under every name it has: Hugging Face's `save_pretrained` drops a tied `lm_head.weight`, and vLLM's
in-place reload then leaves its output head unloaded (measured on the tiny Qwen2: mean |log-prob gap|
0.80 nats after such a "sync", 6e-7 after a full one). This is the path that runs on a CPU build and on
any filesystem the two share; on GPUs the same check guards whatever transport moves the weights.

After each sync the engine scores a fixed probe sequence (`prompt_logprobs`) and the trainer compares
with its own log-probabilities of it; past the tolerance the job fails, loudly, before a rollout is
sampled from weights that are not the ones being trained.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from argus.models.chatml import Media
from trainers.rl.grpo import token_logprobs
from trainers.rl.rollout import Sample

SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # /collective_rpc, for the in-place weight reload
SERVER_ARGS = ["--logprobs-mode", "processed_logprobs"]  # the log-probabilities the trainer recomputes


def cpu_server_args(max_model_len: int) -> list[str]:
    """Whole prefills on vLLM's CPU build. Every rollout request is seeded, and a seeded request has a
    generator of its own. When a prefill is split into chunks, the model runner discards the token it
    sampled for the unfinished chunk and rewinds that generator by its offset; a CPU generator has no
    offset, so the engine dies ("CPU Generator does not use offset", `_bookkeeping_sync`). It happens
    as soon as a turn's prompts outgrow the batch's token budget: 16 episodes of 200-token turns did
    it. Unsplit prefills never rewind, and the seeds (reproducible rollouts) stay. GPUs keep chunking."""
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len, 8192))]


class VLLMEngineError(RuntimeError):
    pass


class VLLMServerEngine:
    """A rollout `Engine` on one vLLM server (`url`: the server's root, without `/v1`)."""

    def __init__(
        self,
        url: str,
        served_name: str,
        stop_ids: list[int],
        *,
        temperature: float,
        timeout_s: float = 600.0,
        concurrency: int = 64,
    ):
        self.url = url.rstrip("/").removesuffix("/v1")
        self.served_name = served_name
        self.stop_ids = stop_ids
        self.temperature = temperature
        self.concurrency = concurrency
        self.client = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def close(self) -> None:
        self.client.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            response = self.client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise VLLMEngineError(f"vLLM server {self.url}{path}: {exc!r}") from exc
        if response.status_code != 200:
            raise VLLMEngineError(f"vLLM server {self.url}{path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def generate(
        self, prompts: list[list[int]], max_new_tokens: list[int], seed: int, media: list[Media | None] | None = None
    ) -> list[Sample]:
        if media and any(m is not None for m in media):
            raise VLLMEngineError("the vLLM engine takes token ids only: images cannot go with them yet")
        seeds = [hash((seed, i)) & 0x7FFFFFFF for i in range(len(prompts))]
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._sample, prompts, max_new_tokens, seeds))

    def _sample(self, ids: list[int], budget: int, seed: int) -> Sample:
        body = {
            "model": self.served_name,
            "prompt": ids,
            "max_tokens": budget,
            "temperature": self.temperature,
            "top_p": 1.0,
            "top_k": -1,
            "seed": seed,
            "stop_token_ids": self.stop_ids,
            "ignore_eos": True,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        choice = self._post("/v1/completions", body)["choices"][0]
        got = choice["logprobs"]
        tokens = [int(t.removeprefix("token_id:")) for t in got["tokens"]]
        logprobs = [float(x) for x in got["token_logprobs"]]
        if len(tokens) != len(logprobs) or len(tokens) > budget:
            raise VLLMEngineError(f"vLLM server {self.url}: {len(tokens)} tokens, {len(logprobs)} log-probabilities")
        return Sample(tokens, logprobs, stopped=bool(tokens) and tokens[-1] in self.stop_ids)

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """The server's log p(ids[t] | ids[:t]) for t ≥ 1, at temperature 1."""
        body = {"model": self.served_name, "prompt": ids, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}
        scored = self._post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
        return [float(entry[str(token)]["logprob"]) for token, entry in zip(ids[1:], scored[1:], strict=True)]

    def load_weights(self, directory: Path) -> None:
        """The server reloads its weights, in place, from the safetensors in `directory`."""
        # A path the server cannot read takes the whole server down with it: check it here first.
        if not (directory / "model.safetensors").is_file():
            raise VLLMEngineError(f"{directory}: no model.safetensors to load")
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}})


def write_weights(module: torch.nn.Module, directory: Path) -> Path:
    """`module`'s full state dict, every tensor under each of its names (tied ones too), as one
    safetensors file in a new `directory` (written next to it and renamed, so a server never reads a
    half-written file)."""
    from safetensors.torch import save_file

    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    state = {name: t.detach().to("cpu").contiguous().clone() for name, t in module.state_dict().items()}
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
    return directory


def probe_gap(engine: VLLMServerEngine, model: torch.nn.Module, ids: list[int]) -> float:
    """Mean |engine - trainer| log-probability over the probe sequence `ids`."""
    theirs = torch.tensor(engine.prompt_logprobs(ids))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = torch.tensor([ids], device=next(model.parameters()).device)
            ours, _entropy = token_logprobs(model, batch, torch.ones_like(batch))
    finally:
        model.train(was_training)
    return float((ours[0].cpu() - theirs).abs().mean())


def served_model(url: str) -> str:
    """The model name a running vLLM server serves (its first)."""
    root = url.rstrip("/").removesuffix("/v1")
    try:
        models = httpx.get(f"{root}/v1/models", timeout=30).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise SystemExit(f"error: rl.vllm.urls: {root} does not answer as a vLLM server: {exc!r}") from None
    if not models:
        raise SystemExit(f"error: rl.vllm.urls: {root} serves no model")
    return str(models[0]["id"])
