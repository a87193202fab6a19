"""A run for Ollama: its GGUF and a Modelfile whose TEMPLATE writes the prompt the run trained with.

    qadapt export RUN_DIR --format ollama --out DIR [--type q4_k_m|q8_0|...]
    ollama create NAME -f DIR/Modelfile

Ollama renders prompts with a Go template, not the Jinja chat template inside the GGUF. The run's Jinja
template is rendered on probe conversations with placeholder texts to find what it writes around each
message: a fixed start, a prefix and suffix per role, and what opens the assistant's reply. Those pieces
fill one fixed Go template (`GO_TEMPLATE`). Before anything is written, the pieces are rendered the way
that Go template renders them (`render_pieces`) and compared with the Jinja template on conversations with
a system prompt, several turns and a reply to come; a template that is not such a wrapping (one that
folds the system prompt into the first user turn, or changes earlier turns later) is refused, saying so.
`PARAMETER stop` lists the template's end-of-turn mark and the EOS, where a reply ends in training.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qadapt.errors import QadaptError
from qadapt.files import refuse_existing

GGUF_NAME = "model.gguf"
MODELFILE = "Modelfile"
_ROLES = ("system", "user", "assistant")
# One message at a time: its role's prefix, text and suffix; an assistant message that ends the
# conversation is left open (Ollama continues it); after a last non-assistant message, the reply opens.
GO_TEMPLATE = (
    "{start}{{{{ range $i, $m := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}"
    "{{{{ if eq $m.Role \"system\" }}}}{system}"
    "{{{{ else if eq $m.Role \"user\" }}}}{user_prefix}{{{{ $m.Content }}}}{user_suffix}"
    "{{{{ else if eq $m.Role \"assistant\" }}}}{assistant_prefix}{{{{ $m.Content }}}}"
    "{{{{ if not $last }}}}{assistant_suffix}{{{{ end }}}}{{{{ end }}}}"
    "{{{{ if and $last (ne $m.Role \"assistant\") }}}}{reply_prefix}{{{{ end }}}}{{{{ end }}}}"
)


@dataclass(frozen=True)
class TurnPieces:
    start: str
    keeps_system: bool  # False: the template drops system messages, and so does the Go template
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    reply_prefix: str
    default_system: str | None = None  # what the template writes as system prompt when given none

    def go_template(self) -> str:
        system = (self.system_prefix + "{{ $m.Content }}" + self.system_suffix) if self.keeps_system else ""
        return GO_TEMPLATE.format(system=system, **{k: v for k, v in vars(self).items() if isinstance(v, str)})


def render_pieces(pieces: TurnPieces, messages: list[dict]) -> str:
    """What Ollama writes for `messages` with GO_TEMPLATE filled with `pieces` (tests run Go's own
    text/template too)."""
    messages = as_ollama_sends(pieces, messages)
    out = pieces.start
    for index, message in enumerate(messages):
        last, role = index == len(messages) - 1, message["role"]
        if role in _ROLES and (role != "system" or pieces.keeps_system):
            out += getattr(pieces, f"{role}_prefix") + message["content"]
            if role != "assistant" or not last:
                out += getattr(pieces, f"{role}_suffix")
        if last and role != "assistant":
            out += pieces.reply_prefix
    return out


def as_ollama_sends(pieces: TurnPieces, messages: list[dict]) -> list[dict]:
    """The messages Ollama renders: the Modelfile's SYSTEM first when no message is a system one."""
    if pieces.default_system is not None and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": pieces.default_system}] + messages
    return messages


def check_conversations() -> list[list[dict]]:
    """Conversations the pieces must reproduce, each ending where a reply is asked for."""
    def turns(n):
        return [m for i in range(n) for m in ({"role": "user", "content": f"Question {i}: 2 + {i}?"},
                                               {"role": "assistant", "content": f"It is {2 + i}."})]

    return [turns(1)[:1], turns(3)[:5], [{"role": "system", "content": "You answer briefly."}] + turns(2)[:3]]


def turn_pieces(tokenizer, template: str) -> TurnPieces:
    """The pieces `template` writes around messages, checked against it (see the module's docstring)."""
    def render(messages, reply=False):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=reply)

    def message(role, n):
        return {"role": role, "content": f"QADAPT{role.upper()}{n}"}

    user, reply, user2 = message("user", 1), message("assistant", 1), message("user", 2)
    first, exchange, two = render([user]), render([user, reply]), render([user, reply, user2])
    asked = render([user], reply=True)
    if not (exchange.startswith(first) and two.startswith(exchange) and asked.startswith(first)):
        raise _not_a_wrapping("it rewrites earlier turns as the conversation grows")
    assistant_prefix, assistant_suffix = exchange[len(first):].split(reply["content"])
    user_prefix, user_suffix = two[len(exchange):].split(user2["content"])
    before_user = first[:first.index(user_prefix + user["content"])]
    system = _system_pieces(render, user_prefix + user["content"])
    start, default_system = before_user, None
    if system is not None:
        opening, system_suffix = system  # opening: the start and the system prefix, always side by side
        default = before_user[len(opening):len(before_user) - len(system_suffix)]
        if before_user == opening + default + system_suffix and default:  # a system prompt when none is given
            start, default_system = "", default
        elif opening.startswith(before_user):
            start = before_user
        else:
            raise _not_a_wrapping("what it writes before the first user turn is neither a start nor a system turn")
    pieces = TurnPieces(start, system is not None, system[0][len(start):] if system else "",
                        system[1] if system else "", user_prefix, user_suffix, assistant_prefix,
                        assistant_suffix, asked[len(first):], default_system)
    for conversation in check_conversations():
        try:
            expected = render(conversation, reply=True)
        except Exception:  # a template that refuses system messages: Ollama's SYSTEM is then dropped
            continue
        if render_pieces(pieces, conversation) != expected:
            raise _not_a_wrapping(f"it writes {expected!r} where the wrapping found writes "
                                  f"{render_pieces(pieces, conversation)!r}")
    if any("{{" in piece or '"""' in piece for piece in vars(pieces).values() if isinstance(piece, str)):
        raise _not_a_wrapping('its text holds "{{" or """, which a Modelfile TEMPLATE cannot quote')
    return pieces


def _system_pieces(render, user_turn: str) -> tuple[str, str] | None:
    """(what comes before a system message's text, what comes after it up to the first user turn), found
    by rendering two different system texts; None if the template drops, refuses or folds them."""
    texts = ("QADAPTSYSTEM1", "QADAPTSYSTEM2")
    try:
        rendered = [render([{"role": "system", "content": text}, {"role": "user", "content": "QADAPTUSER1"}])
                    for text in texts]
    except Exception:
        return None
    if texts[0] not in rendered[0]:
        return None
    opening, rest = rendered[0].split(texts[0], 1)
    if rendered[1] != opening + texts[1] + rest or user_turn not in rest:
        return None
    return opening, rest[:rest.index(user_turn)]


def _not_a_wrapping(why: str) -> QadaptError:
    return QadaptError(f"the run's chat template cannot be stated as an Ollama TEMPLATE: {why}. The GGUF "
                       "carries the template itself (llama.cpp uses it); export with --format gguf and write "
                       "the Modelfile's TEMPLATE by hand")


def modelfile_text(pieces: TurnPieces, stops: list[str]) -> str:
    lines = [f"FROM ./{GGUF_NAME}", f'TEMPLATE """{pieces.go_template()}"""']
    if pieces.default_system is not None:
        lines.append(f'SYSTEM """{pieces.default_system}"""')
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def export_ollama(run_dir: str | Path, out: str | Path, gguf_type: str = "f16", base: str = "dequantized") -> dict:
    """DIR/model.gguf (qadapt.export.gguf_export, checked) and DIR/Modelfile; the pieces are found and
    checked first, so a template Ollama cannot state costs no export."""
    import gguf

    from qadapt.conversations import end_of_turn
    from qadapt.export.gguf_export import export_gguf
    from qadapt.export.merge import exported_chat_template, refuse_unmergeable
    from qadapt.run_dir import RunDir
    from qadapt.tasks import task_named

    run_dir, out = Path(run_dir), Path(out)
    recipe = RunDir(run_dir).trained_recipe
    refuse_unmergeable(recipe, "gguf", "export for Ollama")
    refuse_existing(out)
    tokenizer = task_named(recipe.task).run_tokenizer(recipe, run_dir)
    template = exported_chat_template(tokenizer, recipe.data.template)
    if template is None:
        raise QadaptError("the run's tokenizer has no chat template, so Ollama would not know how to prompt it")
    pieces = turn_pieces(tokenizer, template)
    stops = list(dict.fromkeys(s for s in (end_of_turn(tokenizer, template), tokenizer.eos_token) if s))
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        checks = export_gguf(run_dir, building / GGUF_NAME, gguf_type, base)
        shipped = gguf.GGUFReader(building / GGUF_NAME).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents()
        if shipped != template:  # the Modelfile must state the template the GGUF carries
            raise QadaptError("the GGUF's chat template is not the one the Modelfile was made from")
        (building / MODELFILE).write_text(modelfile_text(pieces, stops), encoding="utf-8")
        building.rename(out)  # the folder appears whole, or not at all
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"wrote {out / MODELFILE}; then: ollama create NAME -f {out / MODELFILE}")
    return checks
