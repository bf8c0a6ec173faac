"""Activation memory of one training step: what autograd keeps per token, layer by layer,
and the logits and loss at the start of backward.

Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198) §4.1 count the tensors autograd keeps per layer, sbh(34 + 5as/h) for
GPT-3 blocks. The same count is redone here for Llama-style blocks as transformers writes
them (RMSNorm saving an fp32 copy, SwiGLU, grouped-query attention through SDPA's
memory-efficient kernel, no dropout) and for the logits and loss, which dominate with
vocabularies of 128k-256k tokens. ``swarm.plan.memory`` adds these as a worker's
training-phase terms.
"""

from __future__ import annotations

from swarm.plan.shapes import ModelShape
from swarm.plan.workload import Workload


def activation_terms(shape: ModelShape, work: Workload) -> list[tuple[str, int]]:
    """Activation memory of one micro-batch at its peak, as (name, bytes) pairs.

    With gradient checkpointing each decoder layer keeps only its input; the backward pass
    then holds one recomputed layer at a time, and before that the logits and the loss. The
    two do not coexist, so the larger is the peak. Without checkpointing every layer keeps
    all it saved for backward while the loss is computed.
    """
    tokens = work.seq_len * work.micro_batch * work.sequences  # a preference pair is two sequences
    d = work.compute_bytes
    h = shape.hidden_size
    per_layer = layer_activation_bytes(shape, work) * tokens
    logits = logits_peak_bytes(shape, work) * tokens
    if work.gradient_checkpointing:
        checkpoints = shape.num_layers * d * h * tokens
        recompute = per_layer + 3 * d * h * tokens  # plus the gradients flowing through it
        if logits >= recompute:
            return [("activations: layer checkpoints", checkpoints), ("activations: logits and loss", logits)]
        return [("activations: layer checkpoints", checkpoints), ("activations: one layer recomputed", recompute)]
    return [("activations: all layers", shape.num_layers * per_layer), ("activations: logits and loss", logits)]


def layer_activation_bytes(shape: ModelShape, work: Workload) -> int:
    """Bytes per token that one decoder layer saves for backward (see the module docstring).

    Counted tensor by tensor for a Llama-style block in transformers: each RMSNorm saves its
    input upcast to fp32 (4h); the attention input (h) is saved once, shared by the frozen
    4-bit matmul and LoRA's A; SDPA keeps q, k, v and its output; o_proj keeps a contiguous
    copy of that output; the MLP input (h); SwiGLU keeps gate, act(gate), up and their
    product (4i). Eager attention (or Gemma 2's soft-capped logits, which need it) also
    keeps the fp32 softmax and its 16-bit copy per head and key position.
    """
    d = work.compute_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    h_q = shape.num_heads * shape.head_dim
    h_kv = shape.num_kv_heads * shape.head_dim
    norms = 4 if shape.model_type.startswith("gemma2") else 2  # Gemma 2 adds post-norms
    eager = work.eager_attention or shape.attention_softcapping
    # SDPA's GQA path needs no mask; a mask (sliding window) or eager attention expands k, v.
    kv_saved = 2 * h_q if eager else 2 * h_kv
    per_token = (
        norms * 4 * h
        + d * h  # attention input
        + d * (h_q + kv_saved)  # q, k, v after rotary embedding
        + 2 * d * h_q  # attention output and o_proj's contiguous input
        + d * h  # MLP input
        + 4 * d * i  # gate, act(gate), up, product
        + 7 * work.lora_r * d  # LoRA A outputs
    )
    if eager:
        per_token += shape.num_heads * work.seq_len * (4 + d)
    return per_token


def logits_peak_bytes(shape: ModelShape, work: Workload) -> int:
    """Bytes per token of the logits and the loss at the start of backward.

    The model output keeps the logits (d bytes per vocabulary entry); the loss upcasts them
    to fp32 and log_softmax keeps its fp32 output; backward then adds the fp32 gradient of
    that output and of its input: d + 12 bytes per entry. Soft-capping keeps two more copies.
    """
    d = work.compute_bytes
    per_entry = d + 12 + (2 * d if shape.attention_softcapping else 0)
    return shape.vocab_size * per_entry + (4 + d) * shape.hidden_size  # plus final norm and head input
