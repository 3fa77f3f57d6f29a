"""DeepEyesV2 data formats, the generated suite, and tiny models (local paths and s3://)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from argus.agent.task import Task
from argus.config import StackSettings
from argus.data import formats
from argus.data.formats import DataFormatError
from argus.data.tasks import build_suite
from argus.storage import download_dir, read_uri, upload_files
from tests.conftest import Cli, s3_endpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackSettings]:
    with s3_endpoint(tmp_path_factory.mktemp("s3")) as stack:
        assert isinstance(stack, StackSettings)
        yield stack


def tasks() -> list[Task]:
    suite = build_suite(seed=5, sft_size=4, rl_size=8, eval_size=4)
    return [m.task for m in suite.rl]


def test_parallel_upload_writes_every_file_and_raises_the_first_failure(tmp_path: Path, s3: StackSettings) -> None:
    files = []
    for i in range(40):
        path = tmp_path / "src" / f"d{i % 3}" / f"f{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([i]) * (i + 1))
        files.append((path, f"s3://{s3.bucket_data}/upload/{path.parent.name}/{path.name}"))
    seen: list[int] = []
    assert upload_files(files, s3, workers=6, on_done=seen.append) == [uri for _p, uri in files]
    assert seen == list(range(1, 41))
    assert all(read_uri(uri, s3) == path.read_bytes() for path, uri in files)
    missing = [*files[:5], (tmp_path / "src" / "gone.bin", f"s3://{s3.bucket_data}/upload/gone.bin")]
    with pytest.raises(FileNotFoundError, match=r"gone\.bin"):
        upload_files(missing, s3, workers=2)


# -- formats ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_formats_round_trip(where: str, tmp_path: Path, s3: StackSettings) -> None:
    base = str(tmp_path) if where == "local" else f"s3://{s3.bucket_data}/roundtrip"
    rows = tasks()
    formats.write_rl_parquet(f"{base}/rl.parquet", rows, s3)
    assert formats.read_rl_parquet(f"{base}/rl.parquet", s3) == [
        Task(**{**t.__dict__, "extra": {"index": i, "data_source": "argus_mini"}}) for i, t in enumerate(rows)
    ]
    examples = [
        (
            [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "<image>\nq"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "Images:\n<image><image>"},
            ],
            [rows[0].image, rows[1].image, rows[2].image],
        )
    ]
    formats.write_sharegpt(f"{base}/sft/sft.json", examples, s3)
    (read,) = formats.read_sharegpt(f"{base}/sft/sft.json", settings=s3)
    assert read.messages == examples[0][0]
    assert [read_uri(p, s3) for p in read.images] == examples[0][1]
    cache = {"7": [("Emblem of X", rows[0].image), ("Emblem of Y", rows[1].image)]}
    formats.write_image_search_cache(f"{base}/search/cache.json", cache, s3)
    loaded = formats.read_image_search_cache(f"{base}/search/cache.json", s3)
    assert [t for t, _p in loaded["7"]] == ["Emblem of X", "Emblem of Y"]
    assert read_uri(loaded["7"][1][1], s3) == rows[1].image


def test_real_deepeyesv2_shapes_load(tmp_path: Path) -> None:
    # DeepEyesV2's files after data_convert.py: absolute image paths; RL rows with image paths and no
    # extra_info.question (the question comes from the prompt).
    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    img.write_bytes(tasks()[0].image)
    (tmp_path / "sft_part_0.json").write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "system", "content": "sys"},
                        {"role": "user", "content": "<image>\nWhat is shown?"},
                        {"role": "assistant", "content": "<think>t</think>\n<answer>a cat</answer>"},
                    ],
                    "images": [str(img)],
                }
            ]
        )
    )
    (example,) = formats.read_sharegpt(str(tmp_path / "sft_part_0.json"))
    assert example.images == [str(img)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    from argus.agent.prompts import USER_PROMPT

    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "data_source": "fvqa",
                    "prompt": [{"role": "user", "content": USER_PROMPT.format(question="Who built it?")}],
                    "images": ["imgs/a.png"],
                    "ability": "search",
                    "env_name": "visual_toolbox_v2",
                    "reward_model": {"style": "model", "ground_truth": "Ada Quill"},
                    "extra_info": {"index": 3, "split": "train"},
                }
            ]
        ),
        tmp_path / "search.parquet",
    )
    (task,) = formats.read_rl_parquet(str(tmp_path / "search.parquet"))
    assert (task.question, task.answer, task.family, task.id) == ("Who built it?", "Ada Quill", "search", "3")
    assert task.image == img.read_bytes()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"messages": [{"role": "robot", "content": "x"}], "images": []}], "row 0: message 0 has role 'robot'"),
        ([{"messages": [{"role": "user", "content": "<image>"}], "images": []}], "row 0: 1 <image> placeholders but 0"),
        (
            [{"messages": [{"role": "user", "content": "<image>"}], "images": ["missing.png"]}],
            "missing.png does not exist",
        ),
        ([{"messages": []}], "row 0: needs a non-empty 'messages' list"),
        ({"not": "a list"}, "expected a list of examples"),
    ],
)
def test_bad_sft_rows_name_the_file_and_row(rows: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=message) as info:
        formats.read_sharegpt(str(path))
    assert str(path) in str(info.value)


# -- the generated suite ---------------------------------------------------------------------------------


def test_generate_is_deterministic_and_complete(tmp_path: Path, cli: Cli) -> None:
    args = ["--sft-size", "12", "--rl-size", "8", "--eval-size", "8", "--runner", "process"]
    a = cli("data", "generate", "--out", str(tmp_path / "a"), "--seed", "3", *args)
    cli("data", "generate", "--out", str(tmp_path / "b"), "--seed", "3", *args)
    cli("data", "generate", "--out", str(tmp_path / "c"), "--seed", "4", *args)
    assert "tasks per slice" in a.stdout and "manifest" in a.stdout
    ma, mb, mc = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "abc")
    assert ma == mb  # same seed, byte-identical files (hashes in the manifest)
    assert ma["files"] != mc["files"]
    for rel, digest in ma["files"].items():
        import hashlib

        assert hashlib.sha256((tmp_path / "a" / rel).read_bytes()).hexdigest() == digest
    required = {
        "sft/sft.json",
        "rl/train.parquet",
        "eval/eval.parquet",
        "search/corpus.jsonl",
        "search/images.jsonl",
        "search/index.sqlite",
        "search/image_search_cache.json",
    }
    assert required <= set(ma["files"])
    assert sum(ma["families"]["sft"].values()) == 12
    examples = formats.read_sharegpt(str(tmp_path / "a" / "sft" / "sft.json"))
    assert len(examples) == 12
    eval_tasks = formats.read_rl_parquet(str(tmp_path / "a" / "eval" / "eval.parquet"))
    train_text = (tmp_path / "a" / "sft" / "sft.json").read_text()
    # Held out: entities asked about in eval never appear in an SFT trajectory's questions.
    eval_entities = {t.question.split(" of ")[-1].split(" founded")[0] for t in eval_tasks if t.family == "search"}
    assert not any(f"{e} founded" in train_text for e in eval_entities)
    inspect = cli("data", "inspect", str(tmp_path / "a" / "sft" / "sft.json"))
    assert "12 trajectories" in inspect.stdout
    assert "Code execution result" in inspect.stdout or "<tool_response>" in inspect.stdout
    assert "8 tasks" in cli("data", "inspect", str(tmp_path / "a" / "eval" / "eval.parquet")).stdout


def test_generate_to_s3(tmp_path: Path, s3: StackSettings) -> None:
    from argus.data.generate import generate
    from tests.conftest import local_tools

    out = f"s3://{s3.bucket_data}/mini-seed-9"
    result = generate(out, tools=local_tools(s3), seed=9, sft_size=4, rl_size=4, eval_size=4, stack=s3)
    local = download_dir(out, tmp_path / "copy", s3)
    assert json.loads((local / "manifest.json").read_text()) == result.manifest
    assert len(formats.read_sharegpt(f"{out}/sft/sft.json", settings=s3)) == 4


def test_inspect_reports_bad_files(tmp_path: Path, cli: Cli) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"messages": [{"role": "robot", "content": "x"}]}]))
    result = cli("data", "inspect", str(bad), check=False)
    assert result.returncode == 1 and f"{bad}: row 0" in result.stderr and "Traceback" not in result.stderr


# -- tiny models --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "qwen2_5_vl"])
def test_tiny_models_load_and_run(arch: str, tmp_path: Path, cli: Cli, s3: StackSettings) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    out = str(tmp_path / arch)
    assert "wrote" in cli("models", "init-tiny", "--arch", arch, "--out", out).stdout
    tok = AutoTokenizer.from_pretrained(out)
    for tag in ("<think>", "</think>", "<code>", "</code>", "<tool_call>", "</tool_call>", "<answer>", "</answer>"):
        assert tok.tokenize(tag) == [tag]  # one token each: a tiny model can learn the format
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    config = AutoConfig.from_pretrained(out)
    ids = torch.tensor([tok("<think>count</think>")["input_ids"]])
    if arch == "qwen2":
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model(input_ids=ids).logits.shape[-1] == config.vocab_size
    else:
        from PIL import Image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        model = AutoModelForImageTextToText.from_pretrained(out)
        processor = Qwen2VLImageProcessorPil.from_pretrained(out)
        pixels = processor(images=[Image.new("RGB", (56, 56), "red")], return_tensors="pt")
        n = int(pixels["image_grid_thw"].prod()) // 4
        prompt = "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>What colour?"
        enc = tok(prompt, return_tensors="pt")
        logits = model(**enc, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"]).logits
        assert logits.shape[:2] == enc["input_ids"].shape
    # The same model through the object store.
    from argus.models.tiny import init_tiny

    init_tiny(arch, f"s3://{s3.bucket_models}/tiny-{arch}", stack=s3)  # type: ignore[arg-type]
    copy = download_dir(f"s3://{s3.bucket_models}/tiny-{arch}", tmp_path / "from-s3", s3)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # same seed, same bytes
        assert (copy / name).read_bytes() == (Path(out) / name).read_bytes(), name


def test_init_tiny_rejects_unknown_arch(cli: Cli, tmp_path: Path) -> None:
    result = cli("models", "init-tiny", "--arch", "llama", "--out", str(tmp_path), check=False)
    assert result.returncode == 2 and "qwen2 or qwen2_5_vl" in result.stderr


def test_the_oracle_table_shows_real_decisions(tmp_path: Path) -> None:
    """Every teacher through the real executor and search proxy: all right on the demonstrations; on the
    target distribution, right on a decision slice only with the habit its cue calls for; all right on
    the slices with no decision."""
    from argus.data.oracle import oracle
    from argus.data.tasks import SLICES, TEACHERS
    from tests.conftest import local_tools

    table = oracle(
        tools=local_tools(StackSettings(home=tmp_path / "home")),
        seed=4,
        sft_size=60,
        rl_size=40,
        eval_size=40,
        dev_size=30,
        per_slice=2,
    )
    assert set(table.cells) == {"sft", "rl", "dev", "eval"}
    assert table.turns["sft"] > table.turns["eval"] == 4
    for split, per_slice in table.cells.items():
        assert set(per_slice) == set(SLICES)
        for name, per_teacher in per_slice.items():
            for t in TEACHERS:
                accuracy = table.accuracy(split, name, t.name)
                right = SLICES[name].right
                fits = all(getattr(t, d) == o for d, o in right.items())
                expected = 1.0 if split == "sft" or fits else 0.0
                assert accuracy == expected, (split, name, t.name, per_teacher)
    columns, rows = table.rows()
    assert len(rows) == 4 * len(SLICES) and len(columns) == 4 + len(TEACHERS)
