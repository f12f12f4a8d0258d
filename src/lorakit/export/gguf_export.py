"""Write an adapter as a llama.cpp LoRA GGUF, or merged into its base GGUF.

**LoRA adapter** (:func:`export_gguf_adapter`), the file llama.cpp's ``convert_lora_to_gguf.py`` writes and
``llama-cli --lora`` / Ollama's ``ADAPTER`` read: metadata ``general.architecture`` (the base's),
``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``; per adapted weight ``W`` (GGUF
name ``<tensor>.weight``) two tensors ``<tensor>.weight.lora_a`` = A, numpy shape (r, in) i.e. GGUF dims
``[in, r]``, and ``<tensor>.weight.lora_b`` = B, (out, r) i.e. ``[r, out]``. llama.cpp computes
``W x + (alpha / r) B (A x)`` with ``r`` = lora_b's ``ne[0]``. The token embedding is the exception
(``llm_build_inp_embd``): ``token_embd.weight.lora_a`` is A transposed, (num_embeddings, r), and its rows are
gathered by token id. For llama's ``attn_q`` / ``attn_k`` the rows of B are permuted as the base GGUF's rows are
(:func:`lorakit.export.base.permute_rows`).

**Merged model** (:func:`export_gguf_merged`) from a base GGUF: every metadata key (tokenizer, hyper-parameters,
chat template) and every tensor is copied as is, except each adapted weight, which becomes ``W + delta``
(dequantized with ``gguf.quants.dequantize`` when ``W`` is quantized, its delta permuted like ``W``'s rows) and is
written as F32 or F16.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorakit.export.adapter import (
    LoraModule,
    check_adapter_mode,
    fold_factor,
    global_alpha,
    read_adapter,
)
from lorakit.export.base import ExportBase, permute_rows, resolve_base, unpermute_rows
from lorakit.export.errors import ExportError

OUTTYPES = {"f32": np.float32, "f16": np.float16}
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"


@dataclass
class ExportReport:
    """What was written, for the command's summary line."""

    path: Path
    arch: str
    tensors: list[str]  # the GGUF weights adapted (adapter) or replaced (merged)
    outtype: str
    alpha: float | None = None  # adapter.lora.alpha (adapter export)
    notes: list[str] = field(default_factory=list)


def export_gguf_adapter(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str = "f32",
    model: str | None = None,
    force: bool = False,
) -> ExportReport:
    """Write the LoRA adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF at ``out``.

    ``model`` overrides the adapter's recorded base (a .gguf file, a folder or a Hub id); only its architecture,
    head counts and (for a GGUF) tensor shapes are read. Raises :class:`ExportError` for adapters a LoRA GGUF
    cannot hold (DoRA, AdaLoRA, bottleneck, modules_to_save, trained biases, PiSSA / OLoRA / LoftQ factors,
    embedding LoRA on a model whose output head is its token embedding).
    """
    dtype = _dtype(outtype)
    out = _check_output(out, force)
    adapter = read_adapter(adapter_dir)
    check_adapter_mode(adapter)
    base = resolve_base(model, adapter.base)
    alpha = global_alpha(adapter)
    if alpha == 0:
        raise ExportError(
            f"{adapter.path} has lora_alpha 0, so its update is zero; llama.cpp reads alpha 0 as 'no scaling' "
            "(scale 1) and would apply B A unscaled. There is nothing to export."
        )
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    notes: list[str] = []
    for module in adapter.modules:
        tensor = _target_tensor(module, base, merged=False)
        factor = fold_factor(module, alpha)
        if factor != 1.0:
            notes.append(f"{tensor}: scaling {module.scaling:g} folded into lora_b (x{factor:.6g})")
        b = module.b * factor
        if module.kind == "embedding":
            lora_a, lora_b = module.a.T, b  # (num_embeddings, r) rows gathered by token; (dim, r)
        else:
            heads = base.permute_heads(tensor)
            lora_a, lora_b = module.a, (b if heads is None else permute_rows(b, heads))
        pairs.append(
            (tensor, np.ascontiguousarray(lora_a, dtype=dtype), np.ascontiguousarray(lora_b, dtype=dtype))
        )
    if adapter.config.get("use_rslora"):
        notes.insert(
            0,
            f"rsLoRA: s = lora_alpha / sqrt(r) = {adapter.config.get('lora_alpha')} / sqrt({adapter.config.get('r')}); "
            f"written as adapter.lora.alpha = s * r = {alpha:g}, so that llama.cpp's alpha / r equals s",
        )

    def write(path: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(path, base.arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(adapter.path.resolve().name)
        writer.add_file_type(
            gguf.LlamaFileType.ALL_F32 if dtype is np.float32 else gguf.LlamaFileType.MOSTLY_F16
        )
        for tensor, lora_a, lora_b in pairs:
            writer.add_tensor(f"{tensor}.lora_a", lora_a)
            writer.add_tensor(f"{tensor}.lora_b", lora_b)
        _finish(writer)

    _write_atomically(out, write)
    return ExportReport(out, base.arch, [tensor for tensor, _, _ in pairs], outtype, alpha, notes)


def export_gguf_merged(
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    outtype: str = "f32",
    model: str | None = None,
    force: bool = False,
) -> ExportReport:
    """Write base GGUF + adapter merged into one GGUF model at ``out``.

    The base (``model``, else the adapter's recorded base) must be a GGUF file (the embedded SmolLM2 is one).
    Metadata and unadapted tensors are copied byte for byte; each adapted weight ``W`` becomes ``W + s B A``
    (DoRA: ``m (W + s B A) / ||W + s B A||_row``; AdaLoRA: ``W + B diag(E) A alpha / init_r``) in float64 from the
    dequantized ``W``, written as ``outtype`` (F32 or F16).
    """
    dtype = _dtype(outtype)
    out = _check_output(out, force)
    adapter = read_adapter(adapter_dir)
    base = resolve_base(model, adapter.base)
    if base.gguf_path is None:
        raise ExportError(
            f"the base model {base.name!r} is a Hugging Face model, not a GGUF file. --merged builds the merged "
            "model from a base GGUF (copying its tokenizer and metadata). For a Hugging Face base take two "
            "steps: lorakit merge --adapter ADAPTER --output_dir MERGED, then llama.cpp's "
            "python convert_hf_to_gguf.py MERGED --outfile OUT.gguf --outtype f16 (optionally llama-quantize). "
            "Or pass a GGUF file of the same base with --model."
        )
    if base.gguf_path.resolve() == out.resolve():
        raise ExportError(f"{out} is the base GGUF itself; choose another output path.")
    targets = {_target_tensor(module, base, merged=True): module for module in adapter.modules}

    def write(path: Path) -> None:
        import gguf

        reader = gguf.GGUFReader(base.gguf_path)
        writer = gguf.GGUFWriter(path, base.arch, endianess=reader.endianess)
        for key, value in reader.fields.items():
            if key.startswith("GGUF.") or key == gguf.Keys.General.ARCHITECTURE:
                continue  # written by GGUFWriter itself
            if key == gguf.Keys.General.ALIGNMENT:
                writer.data_alignment = int(value.contents())
            kind = value.types[0]
            sub = value.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value.contents(), kind, sub_type=sub)
        for tensor in reader.tensors:
            if tensor.name in targets:  # merged: written as outtype, computed one at a time below
                shape = tuple(int(n) for n in reversed(tensor.shape))
                nbytes = int(tensor.n_elements) * np.dtype(dtype).itemsize
                writer.add_tensor_info(tensor.name, shape, np.dtype(dtype), nbytes)
            else:
                writer.add_tensor_info(
                    tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            module = targets.get(tensor.name)
            if module is None:
                writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
            else:
                writer.write_tensor_data(
                    np.ascontiguousarray(merged_tensor(tensor, module, base), dtype=dtype)
                )
        writer.close()

    _write_atomically(out, write)
    notes = [f"{adapter.path.name}: DoRA merged (magnitude rescaling applied)"] if adapter.is_dora else []
    return ExportReport(out, base.arch, sorted(targets), outtype, None, notes)


def merged_tensor(tensor, module: LoraModule, base: ExportBase) -> np.ndarray:
    """``module`` merged into the base GGUF ``tensor`` (a ``gguf.ReaderTensor``), in GGUF row order (float64)."""
    import gguf

    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
    heads = base.permute_heads(tensor.name)
    if heads is None:
        return module.merged_weight(weight)
    return permute_rows(module.merged_weight(unpermute_rows(weight, heads)), heads)


def _target_tensor(module: LoraModule, base: ExportBase, *, merged: bool) -> str:
    """The GGUF weight ``module`` adapts, after checking that the export can hold it."""
    tensor = base.tensor_name(module.name)
    if tensor is None:
        raise ExportError(
            f"module {module.name} has no tensor in llama.cpp's {base.arch} architecture (gguf's TensorNameMap); "
            "the adapter was made for another model, or targets a module llama.cpp does not have."
        )
    if base.tied_embeddings and tensor in (TOKEN_EMBD, OUTPUT):
        if module.name.endswith("lm_head") or tensor == OUTPUT:
            what = "the output head (lm_head), which this base ties to the token embedding (no output.weight)"
        else:
            what = "the token embedding, which this base also uses as its output head (tied embeddings)"
        why = (
            "merging it would change both the input embedding and the output head, while the adapter changes "
            "only one of them"
            if merged
            else "llama.cpp looks LoRA tensors up by name, so it applies a token_embd pair to the tied output head "
            "as well, where its shapes do not fit (llama.cpp aborts with GGML_ASSERT(ggml_can_mul_mat(a, b)))"
        )
        raise ExportError(
            f"module {module.name} adapts {what}: {why}. Retrain without it in target_modules "
            "(e.g. target_modules: all-linear)."
        )
    if module.kind == "embedding" and tensor != TOKEN_EMBD:
        raise ExportError(
            f"embedding module {module.name} maps to {tensor}, which is not llama.cpp's token_embd."
        )
    if base.shapes:
        expected = base.shapes.get(tensor)
        if expected is None:
            raise ExportError(
                f"module {module.name} maps to {tensor}, which the base GGUF {base.gguf_path} lacks."
            )
        if tuple(expected) != module.weight_shape:
            raise ExportError(
                f"module {module.name} updates a {module.weight_shape[0]}x{module.weight_shape[1]} weight but "
                f"{tensor} in the base {base.gguf_path} is {expected[0]}x{expected[1]}: the adapter was trained on "
                "another base model. Pass the right base with --model."
            )
    return tensor


def _dtype(outtype: str):
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}.")
    return OUTTYPES[outtype]


def _check_output(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give the path of the .gguf file to write.")
    if out.exists() and not force:
        raise ExportError(f"{out} exists; choose another path or pass --force to overwrite it.")
    if not out.parent.is_dir():
        raise ExportError(f"the folder {out.parent} does not exist; create it first.")
    return out


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file next to ``out``, then rename it into place (no half-written file)."""
    handle, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(handle)
    partial = Path(name)
    try:
        write(partial)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)  # mkstemp makes the file private; give it a normal file's mode
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
