"""`sheared export --gguf`: a verified GGUF file (llama.cpp's format) beside a verified HF export.

The GGUF file is written from the Hugging Face export itself (`DIR/model-<type>.gguf`, see
`gguf_path`), so it holds exactly the weights that were verified there. It is written under a
temporary name, read back and checked, and only then renamed into place:

- exactness: our GGUF reader (`sheared.model.gguf_file`: dequantized tensors, q/k rows
  un-permuted, the header as `ModelArgs`) must give back the HF weights exactly as rounded to the
  type, and transformers' GGUF loader (`from_pretrained(DIR, gguf_file=...)`) must compute what
  transformers computes with those rounded weights; its tokenizer, built from the GGUF vocabulary,
  must encode like the export's;
- quality: the GGUF model's logits and mean next-token loss against the unrounded HF model, on
  real token ids, within the type's `TOLERANCES` (f32: max |Δlogit| <= 1e-4; f16 and q8_0: a bound
  that follows the logits' scale, and the loss within 0.1% / 1%).

The file follows llama.cpp's conventions for the `llama` architecture: q/k rows in its interleaved
rotary order, no `output.weight` when the embeddings are tied (llama.cpp then reuses
`token_embd.weight`), 1-D tensors (norms, RoPE factors) in float32, and a byte-level BPE
vocabulary (`tokenizer.ggml.model = gpt2`) with its merges.

Modules: `vocabulary` (tokenizer -> GGUF vocabulary, merges, token types, chat template),
`layout` (tensor names, q/k permutation, tied embeddings, which tensor at which type), `writer`
(writing the file: f32 / f16 / q8_0), `verify` (reading back, header check, comparison with the
HF model), `export` (`export_gguf`: write, verify, rename into place; the file in an export).
"""

from sheared.export.gguf.export import (
    FAILED_SUFFIX,
    add_gguf_to_export,
    check_run_for_gguf,
    default_verification_ids,
    export_gguf,
    gguf_path,
    gguf_summary,
    is_export_dir,
)
from sheared.export.gguf.layout import (
    DEFAULT_GGUF_TYPE,
    GGUF_FAMILIES,
    GGUF_TYPES,
    ROTARY_ROWS,
    check_gguf_args,
    check_gguf_type,
    gguf_tensor_names,
    gguf_tensors,
    requested_gguf_type,
    rope_freq_factors,
    tensor_type,
)
from sheared.export.gguf.verify import (
    EXACT_ATOL,
    TOLERANCES,
    GGUFTolerance,
    GGUFVerificationError,
    verify_gguf,
)
from sheared.export.gguf.vocabulary import (
    LLAMA3_SPLIT,
    PRE_TOKENIZERS,
    GGUFVocab,
    gguf_vocab,
    special_token_ids,
    write_vocab,
)
from sheared.export.gguf.writer import FILE_TYPES, encode, rounded, write_gguf

__all__ = [
    "DEFAULT_GGUF_TYPE",
    "EXACT_ATOL",
    "FAILED_SUFFIX",
    "FILE_TYPES",
    "GGUF_FAMILIES",
    "GGUF_TYPES",
    "LLAMA3_SPLIT",
    "PRE_TOKENIZERS",
    "ROTARY_ROWS",
    "TOLERANCES",
    "GGUFTolerance",
    "GGUFVerificationError",
    "GGUFVocab",
    "add_gguf_to_export",
    "check_gguf_args",
    "check_gguf_type",
    "check_run_for_gguf",
    "default_verification_ids",
    "encode",
    "export_gguf",
    "gguf_path",
    "gguf_summary",
    "gguf_tensor_names",
    "gguf_tensors",
    "gguf_vocab",
    "is_export_dir",
    "requested_gguf_type",
    "rope_freq_factors",
    "rounded",
    "special_token_ids",
    "tensor_type",
    "verify_gguf",
    "write_gguf",
    "write_vocab",
]
