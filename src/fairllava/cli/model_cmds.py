"""CLI verbs ``generate``, ``merge`` and ``convert-llava``: thin wrappers over fairllava.models / generation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import FairllavaError
from ._app import app, console


def _dtype_option(default: str = "auto"):
    return typer.Option(default, "--dtype", help="Weights dtype: auto (bf16 where the device has bf16 matmul, else "
                                                 "float32), float32, bfloat16 or float16"
                                                 + (", or checkpoint (as stored)" if default == "checkpoint" else "."))


@app.command()
def generate(
    model: Path = typer.Option(..., "--model", help="Model folder (HF format; LLaVA family or the embedded VLM)."),
    data: Path = typer.Option(..., "--data", help="Records JSONL (id, image, conversations, attributes)."),
    out: Path = typer.Option(..., "--out", help="Predictions JSONL to write."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image root the records' paths are relative to."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="PEFT adapter folder to apply on --model."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generate() call (left padded)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Greedy decoding budget per sample."),
    max_length: int = typer.Option(2048, "--max-length", min=2, help="Longest prompt (tokens, image tokens included)."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over instead of skipping ids already written."),
    dtype: str = _dtype_option(),
    device: Optional[str] = typer.Option(None, "--device", help="torch device, e.g. cuda:0 (default: cpu)."),
    no_prompt: bool = typer.Option(False, "--no-prompt", help="Do not store the prompt in each row."),
    system_prompt: Optional[str] = typer.Option(
        None, "--system-prompt", help="Chat-template system turn; use the one the model was trained with "
                                      "(the run's data.system_prompt; default: the template's own)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the folder."),
) -> None:
    """Greedy, batched, resumable generation into a predictions JSONL (the input of `fairllava evaluate`)."""
    from ..generation import generate_predictions
    from ..models.loading import load_vlm

    if images is None:
        console.print("[yellow]note:[/yellow] no --images given; records with images will fail", highlight=False)
    from ..models.precision import resolve_dtype

    # `auto` means the precision that is fast on the device the model will run on (--device, default cpu)
    m, processor = load_vlm(model, dtype=resolve_dtype(dtype, device or "cpu", key="--dtype"), adapter=adapter,
                            trust_remote_code=trust_remote_code)
    if device:
        try:
            m.to(device)
        except (RuntimeError, AssertionError) as e:
            raise FairllavaError(f"--device {device}: {e}") from None
    res = generate_predictions(
        m, processor, data, out, image_root=images, batch_size=batch_size, max_new_tokens=max_new_tokens,
        resume=not no_resume, include_prompt=not no_prompt, max_length=max_length, system_prompt=system_prompt,
    )
    console.print(
        f"wrote {res.n_total} predictions to {res.out_path} ({res.n_generated} generated, {res.n_resumed} resumed; "
        f"{res.new_tokens} new tokens in {res.seconds:.1f}s)",
        highlight=False,
    )


@app.command()
def merge(
    base: Path = typer.Option(..., "--base", help="Base model folder."),
    adapter: Path = typer.Option(..., "--adapter", help="PEFT adapter folder (LoRA + projector)."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged model (written atomically)."),
    dtype: str = _dtype_option("checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Merge a LoRA adapter into its base model and save a plain HF model folder."""
    from ..models.loading import merge_adapter

    path = merge_adapter(base, adapter, out, dtype=dtype, overwrite=overwrite)
    console.print(f"merged model written to {path}", highlight=False)


@app.command("convert-llava")
def convert_llava(
    src: Path = typer.Argument(..., help="Original-LLaVA-format checkpoint folder (config with mm_vision_tower)."),
    out: Path = typer.Argument(..., help="Output folder for the HF LlavaForConditionalGeneration model."),
    vision_tower: Optional[Path] = typer.Option(
        None, "--vision-tower", help="Local CLIP model folder (default: the config's mm_vision_tower path)."),
    dtype: str = _dtype_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Convert a LLaVA-1.5 / LLaVA-Rad style checkpoint into an HF LLaVA folder (CLIP towers only)."""
    from ..models.convert import convert_llava_checkpoint

    path = convert_llava_checkpoint(src, out, vision_tower=vision_tower, dtype=dtype, overwrite=overwrite)
    console.print(f"converted model written to {path}", highlight=False)
