"""Property tests for hostile input at the edge: task specs, the Text type, JSONL datasets, and
the byte bound that refuses huge classify inputs unread.

Whatever strings or bytes arrive, validation either accepts them or raises a validation error
(never TypeError, UnicodeError, ...), and what it accepts can be UTF-8 encoded and rendered.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydantic
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from anchor_cache.data import read_jsonl
from anchor_cache.errors import ValidationError
from anchor_cache.task import TEXT_SLOT, DemonstrationSource, FormatText, TaskSpec, Text, label_index
from tests.conftest import CORPUS, error_of, tiny_config

SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Any Python str, lone surrogates included (JSON "\ud800" decodes to one), with the characters
# that matter here mixed in often enough to be found.
ANY_CHAR = st.characters(codec=None, exclude_categories=())
FRAGMENTS = st.sampled_from(
    ["{text}", "{", "}", "{0}", "\x00", "\ud800", "\udfff", " ", "\n", "\t", "\u3000", "ß", "İ", "Positive", "a"]
)
ANY_TEXT = st.lists(st.one_of(st.text(alphabet=ANY_CHAR, max_size=6), FRAGMENTS), max_size=6).map("".join)
VALID_TEXT = st.text(max_size=40)  # hypothesis' default alphabet: encodable, no surrogates


def encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


CLEAN_TEXT = st.text(max_size=10)
WORDS = st.one_of(
    st.sampled_from(["Negative", "Positive", "neutral", " Mixed ", "ß", "SS", "İ"]), CLEAN_TEXT.filter(str.strip)
)
HOSTILE = st.one_of(FRAGMENTS, ANY_TEXT)


@st.composite
def task_inputs(draw):
    """Raw TaskSpec keyword arguments: a plausible spec, often with hostile strings spliced in."""
    template = draw(CLEAN_TEXT) + TEXT_SLOT + draw(CLEAN_TEXT)
    labels = draw(st.lists(WORDS, min_size=2, max_size=4, unique_by=lambda s: s.strip().lower()))
    demos = [
        [draw(CLEAN_TEXT), draw(st.sampled_from([label, label.upper(), f" {label.lower()}\t"]))] for label in labels
    ]
    demos += [
        [draw(CLEAN_TEXT), draw(st.one_of(st.sampled_from(labels), WORDS))] for _ in range(draw(st.integers(0, 2)))
    ]
    spec = {
        "name": "prop",
        "template": template,
        "labels": labels,
        "separator": draw(st.sampled_from(["\n", " ", "\n\n"])),
    }
    # Splice hostile strings into a few fields (or replace them), at random positions.
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(["template", "separator", "labels", "demo_text", "demo_label"]))
        bad = draw(HOSTILE)
        if field in ("template", "separator"):
            spec[field] = _splice(draw, spec[field], bad)
        elif field == "labels":
            i = draw(st.integers(0, len(labels) - 1))
            labels[i] = _splice(draw, labels[i], bad)
        else:
            demo = draw(st.sampled_from(demos))
            k = 0 if field == "demo_text" else 1
            demo[k] = _splice(draw, demo[k], bad)
    if draw(st.sampled_from([False] * 9 + [True])):
        labels[:] = draw(st.lists(ANY_TEXT, max_size=3))
    spec["demonstrations"] = [{"text": t, "label": lab} for t, lab in draw(st.permutations(demos))]
    return spec


def _splice(draw, value: str, bad: str) -> str:
    if draw(st.booleans()):
        return bad
    at = draw(st.integers(0, len(value)))
    return value[:at] + bad + value[at:]


def _build(spec: dict) -> TaskSpec | None:
    try:
        return TaskSpec(**spec)
    except pydantic.ValidationError as exc:
        str(exc)  # the error itself renders
        for err in exc.errors():
            assert encodes(err["msg"]), err["msg"]  # what the server echoes back can be sent
        return None


@SETTINGS
@given(task_inputs())
def test_task_spec_validates_or_raises_validation_error_only(spec):
    task = _build(spec)
    if task is None:
        return
    assert task.template.count(TEXT_SLOT) == 1
    assert task.template == task.template.rstrip()
    assert all(label == label.strip() and label for label in task.labels)
    assert len({label.strip().lower() for label in task.labels}) == len(task.labels)
    assert len(task.labels) >= 2
    strings = [task.template, task.separator, *task.labels]
    assert not any("\x00" in s for s in strings)
    demonstrated = {label_index(d.label, task.labels) for d in task.demonstrations}
    assert demonstrated == set(range(len(task.labels)))
    strings += [s for d in task.demonstrations for s in (d.text, d.label)]
    assert all(encodes(s) for s in strings)


@pytest.mark.parametrize("bad", ["\ud800", "\x00"], ids=["surrogate", "nul"])
@pytest.mark.parametrize("field", ["template", "labels", "separator", "text", "label", "name"])
def test_one_hostile_field_is_a_validation_error(field, bad):
    spec = {
        "name": "prop",
        "template": "Review: {text}\nSentiment:",
        "labels": ["Negative", "Positive"],
        "demonstrations": [{"text": "x", "label": "Negative"}, {"text": "y", "label": "Positive"}],
    }
    if field == "template":
        spec["template"] = "Review: {text}" + bad + "\nSentiment:"
    elif field == "labels":
        spec["labels"] = ["Negative", "Posi" + bad + "tive"]
    elif field == "separator":
        spec["separator"] = "\n" + bad
    elif field == "text":
        spec["demonstrations"][0]["text"] = "x" + bad
    elif field == "label":
        spec["demonstrations"][0]["label"] = "Negative" + bad
    else:
        spec["name"] = "prop" + bad
    if field == "text" and bad == "\x00":
        assert TaskSpec(**spec).demonstrations[0].text == "x\x00"  # NUL is allowed in free text
        return
    with pytest.raises(pydantic.ValidationError) as info:
        TaskSpec(**spec)
    message = str(info.value)
    if bad == "\ud800" and field != "name":
        assert "contains a lone surrogate (\\ud800) at position" in message
    elif field in ("template", "labels", "separator"):
        assert "contains a NUL character (\\x00) at position" in message
    elif field == "label":
        assert "unknown label" in message


@st.composite
def accepted_tasks(draw):
    prefix = draw(VALID_TEXT.filter(lambda s: TEXT_SLOT not in s))
    suffix = draw(VALID_TEXT.filter(lambda s: TEXT_SLOT not in s))
    labels = draw(
        st.lists(st.text(min_size=1, max_size=8), min_size=2, max_size=4, unique_by=lambda s: s.strip().lower())
    )
    spec = {
        "name": "prop",
        "template": prefix + TEXT_SLOT + suffix,
        "labels": labels,
        "demonstrations": [{"text": "t", "label": label} for label in labels],
    }
    task = _build(spec)
    assume(task is not None)
    return task


@SETTINGS
@given(accepted_tasks(), VALID_TEXT)
def test_render_puts_the_text_in_the_slot_verbatim(task, text):
    prefix, _, suffix = task.template.partition(TEXT_SLOT)
    rendered = task.render(text)
    assert rendered == prefix + text + suffix
    assert text in rendered and rendered.startswith(prefix) and rendered.endswith(suffix)
    assert task.render("{text}{0}{}") == prefix + "{text}{0}{}" + suffix


@SETTINGS
@given(accepted_tasks(), st.data())
def test_label_index_ignores_case_and_surrounding_whitespace(task, data):
    i = data.draw(st.integers(0, len(task.labels) - 1))
    label = task.labels[i]
    assert task.label_index(label) == i
    spelling = data.draw(st.sampled_from([label.upper(), label.lower(), label.swapcase(), label.title()]))
    assume(spelling.lower() == label.lower())  # e.g. "ß".upper() == "SS" is another word
    pad = data.draw(st.sampled_from(["", " ", "\t", "\n ", "\u3000"]))
    assert task.label_index(pad + spelling + pad[::-1]) == i
    other = data.draw(ANY_TEXT)
    if all(other.strip().lower() != known.lower() for known in task.labels):
        with pytest.raises(ValidationError, match="unknown label"):
            task.label_index(other)


@SETTINGS
@given(ANY_TEXT)
def test_text_types_accept_exactly_the_encodable_strings(value):
    text = pydantic.TypeAdapter(Text)
    fmt = pydantic.TypeAdapter(FormatText)
    if encodes(value):
        assert text.validate_python(value) == value
    else:
        with pytest.raises(pydantic.ValidationError, match="lone surrogate"):
            text.validate_python(value)
    if encodes(value) and "\x00" not in value:
        assert fmt.validate_python(value) == value
    else:
        with pytest.raises(pydantic.ValidationError):
            fmt.validate_python(value)
    # Through JSON, as the server receives it: "\ud800" escapes decode to lone surrogates, but an
    # escaped high-low pair decodes to the one character it encodes (what the server then sees).
    payload = json.dumps(value)  # ensure_ascii: surrogates become \ud800 escapes
    assert encodes(json.loads(payload)) == _validates(lambda: text.validate_json(payload))


def _validates(fn) -> bool:
    try:
        fn()
    except pydantic.ValidationError:
        return False
    return True


@SETTINGS
@given(st.one_of(ANY_TEXT, st.sampled_from(["", "data\x00.jsonl", "a/\ud800.jsonl", "d/train.jsonl"])))
def test_demonstration_source_path(path):
    ok = _validates(lambda: DemonstrationSource(path=path))
    assert ok == (path != "" and "\x00" not in path and encodes(path))


# ---- read_jsonl: arbitrary bytes ---------------------------------------------------------------

LABELS = ["Negative", "Positive", "3"]
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    ANY_TEXT,
    st.sampled_from([*LABELS, " positive ", "NEGATIVE", "\ud800"]),
    st.lists(st.integers(), max_size=2),
)
ROW = st.one_of(
    st.fixed_dictionaries({"text": JSON_VALUES, "label": JSON_VALUES}),
    st.fixed_dictionaries({"text": ANY_TEXT, "label": st.sampled_from([*LABELS, 3, "positive"])}),
    st.dictionaries(st.sampled_from(["text", "label", "x"]), JSON_VALUES, max_size=3),
    JSON_VALUES,
)
ROW_LINE = ROW.map(lambda r: json.dumps(r).encode())  # ensure_ascii: surrogates as escapes
LINE = st.one_of(ROW_LINE, st.binary(max_size=20), st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"[" * 3000]))
FILE_BYTES = st.one_of(st.binary(max_size=200), st.lists(LINE, max_size=5).map(b"\n".join))


@pytest.fixture(scope="module")
def secret_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outside-data-root-secret")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@SETTINGS
@given(content=FILE_BYTES)
def test_read_jsonl_returns_rows_or_raises_validation_error(secret_dir, content):
    path = secret_dir / "train.jsonl"
    path.write_bytes(content)
    try:
        rows = read_jsonl(path, LABELS)
    except ValidationError as exc:
        message = str(exc)
        assert str(secret_dir) not in message and "outside-data-root-secret" not in message
        assert message.startswith("train.jsonl:")
        assert encodes(message)
        return
    for row in rows:
        assert isinstance(row.text, str) and encodes(row.text)
        assert 0 <= row.label < len(LABELS)


def test_read_jsonl_messages(secret_dir):
    path = secret_dir / "data.jsonl"
    cases = {
        b'{"text": "ok", "label": "positive"}\n\xff\n': "data.jsonl:2: not valid UTF-8",
        b'{"text": "ok", "label": "positive"}\n[1, 2]\n': "got a JSON array",
        b'{"text": ["a"], "label": "positive"}\n': '"text" must be a string, got a JSON array',
        b'{"text": "a", "label": null}\n': '"label" must be a string (a label word), got a JSON null',
        b'{"text": "a\\ud800", "label": "positive"}\n': '"text" contains a lone surrogate (\\ud800) at position 1',
        b'{"text": "a", "label": "maybe"}\n': "data.jsonl:1: unknown label 'maybe'",
        b'{"text": "a"}\n': "missing ['label']",
    }
    for content, message in cases.items():
        path.write_bytes(content)
        with pytest.raises(ValidationError) as info:
            read_jsonl(path, LABELS)
        assert message in str(info.value)
        assert str(secret_dir) not in str(info.value)
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": 3}\r\n\n{"text": "b\\u0000", "label": " positive "}\n')
    assert [(r.text, r.label) for r in read_jsonl(path, LABELS)] == [("a", 2), ("b\x00", 1)]
    with pytest.raises(ValidationError, match=r"^dataset file missing\.jsonl does not exist$"):
        read_jsonl(secret_dir / "missing.jsonl", LABELS)


# ---- the HTTP protocol model -------------------------------------------------------------------


@SETTINGS
@given(st.one_of(ANY_TEXT, st.lists(ANY_TEXT, max_size=3)), ANY_TEXT)
def test_classify_request_refuses_unencodable_input(value, task):
    """server/protocol.py types `input` as `Text | list[Text]`: lone surrogates are a 422, not a crash."""
    from server.protocol import ClassifyRequest

    for build in (
        lambda: ClassifyRequest(task=task, input=value),
        lambda: ClassifyRequest.model_validate_json(json.dumps({"task": task, "input": value})),
    ):
        try:
            request = build()
        except pydantic.ValidationError:
            continue
        assert all(encodes(t) for t in request.texts)
    texts = [value] if isinstance(value, str) else value
    if not all(encodes(t) for t in texts):
        with pytest.raises(pydantic.ValidationError):
            ClassifyRequest(task="t", input=value)


# --- the byte pre-check of classify inputs ---------------------------------------------------------

# A word of 4-byte characters (mathematical letters), repeated in the corpus until it is one token:
# longer in characters than any other token, so it sets the bound's bytes per token, and at 4 bytes
# a character it covers as many bytes as a token of that length can.
WIDE_WORD = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢𝔱𝔢𝔵𝔱𝔞𝔫𝔡𝔪𝔬𝔯𝔢𝔰𝔬"


def save_sentencepiece_model(folder: Path) -> Path:
    """The tiny Llama with a sentencepiece-style vocabulary (Metaspace, byte fallback), as Llama 2,
    Mistral and Gemma ship: its tokens are characters, not bytes, so one token can cover up to 4
    bytes per character of its text."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    corpus = [*CORPUS, WIDE_WORD * 3, "猫が好きです 中文文本 😀😀 🎉"] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=700, special_tokens=[
        "<unk>", "<s>", "</s>", *byte_tokens]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", len(fast))).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer_model(request, model_dir, tmp_path_factory) -> Path:
    if request.param == "byte-level":
        return model_dir
    return save_sentencepiece_model(tmp_path_factory.mktemp("sentencepiece"))


MAX_INPUT_TOKENS = 64


def test_the_byte_pre_check_never_refuses_an_input_that_fits(serve, tokenizer_model):
    """Inputs are refused unread past a byte bound (a huge input costs nothing); the bound must
    never catch an input whose tokens fit max_input_tokens. The texts repeat the tokens that cover
    the most bytes, where the bound is tightest, amid any characters."""
    client = serve(model=str(tokenizer_model), max_input_tokens=MAX_INPUT_TOKENS)
    engine = client.app.state.anchor.engine
    prompt = client.portal.call(engine.view, "sentiment").prompt
    tokenizer = prompt.tokenizer
    texts = {tokenizer.convert_tokens_to_string([token]) for token in tokenizer.get_vocab()}
    widest = sorted(texts, key=lambda text: len(text.encode()), reverse=True)[:8]
    pieces = st.one_of(st.text(max_size=4), st.sampled_from(widest))
    inputs = st.builds(lambda head, piece, times, tail: head + piece * times + tail, st.text(max_size=8),
                       st.sampled_from(widest), st.integers(1, MAX_INPUT_TOKENS),
                       st.lists(pieces, max_size=8).map("".join)).filter(bool)

    @SETTINGS
    @example(widest[0] * (MAX_INPUT_TOKENS - len(prompt.encode(""))))
    @given(inputs)
    def fits_and_is_served(text: str) -> None:
        answer = client.post("/v1/classify", json={"task": "sentiment", "input": text})
        if len(prompt.encode_batch([text])[0]) <= MAX_INPUT_TOKENS:
            assert answer.status_code == 200, (len(text.encode()), answer.text)
        else:  # what does not fit is refused, by bytes or by tokens
            error_of(answer, 400, "input_limit")

    fits_and_is_served()
