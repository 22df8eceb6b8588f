"""``himap tiny-model``: write a tiny random LLaVA (offline) for trying the CLI and the API."""

from __future__ import annotations

from pathlib import Path

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import fail


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the model, processor and example.png to."),
    backbone: str = typer.Option("llama", "--backbone", help="llama, mistral or qwen2."),
    layers: int = typer.Option(8, "--layers", min=2),
    hidden: int = typer.Option(128, "--hidden", min=16),
    heads: int = typer.Option(4, "--heads", min=1),
    kv_heads: int = typer.Option(4, "--kv-heads", min=1),
    image_size: int = typer.Option(96, "--image-size", min=8, help="Pixels; tokens = (size / patch)^2."),
    patch_size: int = typer.Option(4, "--patch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build a tiny random LLaVA offline and save it (safetensors) with its processor.

    Its answers are meaningless (random weights); it exists for mechanics and timing.
    """
    from himap_vlm.models.tiny import TinyLlavaSpec, save_tiny_llava

    if hidden % heads or heads % kv_heads:
        fail("--hidden must be divisible by --heads, and --heads by --kv-heads")
    if backbone not in ("llama", "mistral", "qwen2"):
        fail(f"--backbone must be llama, mistral or qwen2; got {backbone!r}")
    if image_size % patch_size:
        fail(f"--image-size ({image_size}) must be a multiple of --patch-size ({patch_size})")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".himap-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        fail(f"cannot write to {str(out)!r} ({exc.strerror or exc}); pass a writable directory")
    spec = TinyLlavaSpec(
        backbone=backbone,
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_heads=heads,
        num_kv_heads=kv_heads,
        image_size=image_size,
        patch_size=patch_size,
        seed=seed,
    )
    path = save_tiny_llava(out, spec)
    typer.echo(f"wrote {path} ({spec.num_image_tokens} image tokens, {layers} layers); example image: {path / 'example.png'}")
