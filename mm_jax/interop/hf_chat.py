"""The run's prompt format as a Hugging Face chat template and generation config.

An exported folder carries them so that `processor.apply_chat_template(messages,
add_generation_prompt=True)` (HF generation, lmms-eval's HF LLaVA path) gives the prompt
the model was trained on: the same text `mm_jax.infer.prompts` cuts from a training sample
before its answer (`<bos>`, system text, media tags, `ASSISTANT:`...), and generation stops
where training put the answer's end token.

Messages are HF's: {"role": "user" | "assistant" | "system", "content": str or a list of
{"type": "image" | "video" | "audio"} and {"type": "text", "text": ...}}. A list puts one
tag line per media item in front of its text, images first (`prompts._with_tags`'s order);
a string is used as written. System messages are dropped: each template has a fixed system
text (vicuna_v1) or none, as in training.
"""

from __future__ import annotations

from mm_jax.config import Config
from mm_jax.data import templates
from mm_jax.data.text import AUDIO_TAG, IMAGE_TAG, VIDEO_TAG

# content -> text: tag lines for media items (images, then videos, then audio), then text.
_CONTENT = (
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{ c }}{%- else -%}"
    "{%- for kind, tag in [('image', '" + IMAGE_TAG + "'), ('video', '" + VIDEO_TAG + "'), "
    "('audio', '" + AUDIO_TAG + "')] -%}"
    "{%- for item in c if item['type'] == kind -%}{{ tag }}\n{% endfor -%}"
    "{%- endfor -%}"
    "{%- for item in c if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}")

_TURNS = "{%- for m in messages if m['role'] != 'system' -%}"

# templates.py's layouts, turn by turn; the generation prompt is what precedes an answer.
_TEMPLATES = {
    # `<bos>{SYSTEM} USER: {human} ASSISTANT: {gpt}</s>USER: ...`
    "vicuna_v1": (
        "{{- bos_token -}}" + _TURNS +
        "{%- if m['role'] == 'user' -%}"
        "{%- if loop.first -%}" + templates.VICUNA_V1_SYSTEM + " {% endif -%}"
        "USER: {{ content(m['content']) }} ASSISTANT:"
        "{%- else %} {{ content(m['content']) }}{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    # `<|begin_of_text|>` then per turn `<|start_header_id|>{role}<|end_header_id|>\n\n
    # {text, trimmed}<|eot_id|>`; the prompt ends with the assistant header and "\n\n".
    "llama3": (
        "<|begin_of_text|>" + _TURNS +
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ content(m['content']) | trim }}<|eot_id|>"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
    # Stage 1: `<bos>{the human turn's tags}{caption}<eos>`: the human text is dropped.
    "plain": (
        "{{- bos_token -}}" + _TURNS +
        "{%- if m['role'] == 'user' -%}"
        "{%- if m['content'] is string -%}"
        "{%- for t in ['" + IMAGE_TAG + "', '" + VIDEO_TAG + "', '" + AUDIO_TAG + "'] -%}"
        "{{ t * (m['content'].count(t)) }}{%- endfor -%}"
        "{%- else -%}{%- for item in m['content'] if item['type'] != 'text' -%}"
        "<{{ item['type'] }}>{%- endfor -%}{%- endif -%}"
        "{%- else -%}{{ content(m['content']) }}{{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"),
    # The synthetic sources' word prompts: `<bos>{words}` and `{answer words}<eos>`, lower
    # case with "?" a word of its own (prompts._words).
    "synthetic": (
        "{{- bos_token -}}" + _TURNS +
        "{%- if m['role'] == 'user' -%}{{ content(m['content']) | lower | replace('?', ' ?') }}"
        "{%- else %} {{ content(m['content']) | lower | replace('?', ' ?') }} {{ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"),
}


def template_name(cfg: Config) -> str:
  """The prompt layout of the run: its data.template, or the synthetic sources' words."""
  return "synthetic" if cfg.data.source in ("synthetic", "synthetic_av") else cfg.data.template


def chat_template(cfg: Config) -> str:
  """A Jinja chat template that renders the run's prompts (see the module docstring)."""
  return _CONTENT + _TEMPLATES[template_name(cfg)]


def generation_config(cfg: Config, special: dict[str, int | None],
                      stop_ids: tuple[int, ...]) -> dict:
  """generation_config.json: the tokenizer's bos/pad, every stop id of the run
  (`prompts.stop_ids`: the template's end token, eos, config.generate.stop) as eos, and
  config.generate's decoding (greedy when temperature is 0)."""
  g = cfg.generate
  out = {k: v for k, v in special.items() if v is not None and k != "eos_token_id"}
  if stop_ids:
    out["eos_token_id"] = list(stop_ids) if len(stop_ids) > 1 else stop_ids[0]
  out.update(max_new_tokens=g.max_new_tokens, do_sample=g.temperature > 0)
  if g.temperature > 0:
    out.update(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  return out
