"""The Ollama ``Modelfile`` written beside a GGUF export, so ``ollama create NAME -f Modelfile`` works.

Ollama's prompt templates are Go templates, not the Jinja chat templates of transformers, and
there is no general translation between the two. A chat template is recognised here by the
markers that name its family (ChatML, Llama 3, Mistral ``[INST]``, Gemma); each family gets
an equivalent Go template and the markers that must stop generation. A template of another
family gets no TEMPLATE line, so Ollama falls back on its own detection from the GGUF's
``tokenizer.chat_template``; a model without a chat template gets the plain prompt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFamily:
    """A family of chat templates: how to spot it, its Go template, its stop markers."""

    name: str
    markers: tuple[str, ...]
    template: str
    stops: tuple[str, ...]


FAMILIES = (
    ChatFamily(
        "chatml", ("<|im_start|>", "<|im_end|>"),
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    ChatFamily(
        "llama3", ("<|start_header_id|>", "<|eot_id|>"),
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
        "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    ChatFamily(
        "mistral", ("[INST]", "[/INST]"),
        '{{- range .Messages }}{{ if eq .Role "assistant" }} {{ .Content }}</s>'
        "{{ else }}[INST] {{ .Content }} [/INST]{{ end }}{{ end }}",
        ("[INST]", "[/INST]"),
    ),
    ChatFamily(
        "gemma", ("<start_of_turn>", "<end_of_turn>"),
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
)


def chat_family(chat_template: str | None) -> ChatFamily | None:
    """The family whose markers all appear in ``chat_template``, or None."""
    for family in FAMILIES:
        if chat_template and all(marker in chat_template for marker in family.markers):
            return family
    return None


def modelfile(gguf_file: str, chat_template: str | None, eos_token: str | None) -> str:
    """The text of a Modelfile for ``gguf_file`` (a name relative to the Modelfile's folder).

    Args:
        gguf_file: the GGUF the model is made from.
        chat_template: the tokenizer's Jinja chat template, or None.
        eos_token: the tokenizer's end-of-sequence token, always a stop.
    """
    family = chat_family(chat_template)
    lines = [
        "# Made by swarm. Run: ollama create MODEL -f Modelfile && ollama run MODEL",
        f"FROM ./{gguf_file}",
    ]
    if family is not None:
        lines.append(f"# Chat template: {family.name}, as in the tokenizer's chat template.")
        lines.append(f'TEMPLATE """{family.template}"""')
    elif chat_template:
        lines.append("# No TEMPLATE: swarm does not know this chat template's family; Ollama reads the")
        lines.append("# template the GGUF carries (tokenizer.chat_template) and picks its own.")
    else:
        lines.append("# The tokenizer has no chat template: the prompt goes to the model as it is.")
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    stops = list(family.stops if family else ())
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f"PARAMETER stop {_quote(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
