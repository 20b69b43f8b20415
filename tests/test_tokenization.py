"""Label masks cover exactly the response tokens; truncation never drops every response token silently."""

import pytest
import torch

from rose_select.errors import ConfigError, DataError
from rose_select.records import Message, PreferenceTriple
from rose_select.testing import build_tiny_tokenizer
from rose_select.tokenization import (IGNORE_INDEX, TokenizeConfig, collate, encode_messages,
                                      encode_prompt, encode_triple, render)

CONV = [Message("user", "What is the capital?"), Message("assistant", "Paris is."),
        Message("user", "And Spain?"), Message("assistant", "Madrid.")]


@pytest.fixture(params=[False, True], ids=["less", "chat"])
def tok(request):
    return build_tiny_tokenizer(chat_template=request.param)


def _target_text(tok, enc):
    return tok.decode([i for i, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE_INDEX])


def test_labels_cover_exactly_the_answers(tok):
    enc = encode_messages(CONV, tok, TokenizeConfig(max_length=512))
    text, spans = render(CONV, tok)
    answers = "".join(text[s:e] for s, e in spans)
    assert _target_text(tok, enc) == answers
    assert "Paris is." in answers and "Madrid." in answers and "capital" not in answers
    assert answers.count(tok.eos_token) == 2  # each answer ends with the end-of-turn token
    # labels equal the ids wherever they are not ignored
    assert all(l in (IGNORE_INDEX, i) for i, l in zip(enc["input_ids"], enc["labels"]))


def test_less_format_is_used_without_chat_template():
    tok = build_tiny_tokenizer(chat_template=False)
    text, _ = render(CONV, tok)
    assert text.startswith(tok.bos_token + "<|user|>\nWhat is the capital?\n<|assistant|>\nParis is.")


def test_chat_template_forced_without_one_is_an_error():
    with pytest.raises(ConfigError, match="no chat template"):
        encode_messages(CONV, build_tiny_tokenizer(), TokenizeConfig(template="chat"))


def test_multi_turn_keeps_the_end_and_single_turn_keeps_the_response(tok):
    full = encode_messages(CONV, tok, TokenizeConfig(max_length=512))
    cut = encode_messages(CONV, tok, TokenizeConfig(max_length=12))
    assert cut["input_ids"] == full["input_ids"][-12:]
    single = CONV[:2]
    full1 = encode_messages(single, tok, TokenizeConfig(max_length=512))
    n_prompt = next(i for i, l in enumerate(full1["labels"]) if l != IGNORE_INDEX)
    cut1 = encode_messages(single, tok, TokenizeConfig(max_length=n_prompt))  # the prompt alone fills it
    assert len(full1["input_ids"]) - n_prompt <= n_prompt - n_prompt // 2  # the short answer fits its cap
    assert cut1["input_ids"] == full1["input_ids"][-n_prompt:]  # whole answer kept, prompt cut from the left
    assert sum(l != IGNORE_INDEX for l in cut1["labels"]) == sum(l != IGNORE_INDEX for l in full1["labels"])
    plain = encode_messages(single, tok, TokenizeConfig(max_length=n_prompt + 2, truncation="keep_start"))
    assert plain["input_ids"] == full1["input_ids"][: n_prompt + 2]


def test_fully_truncated_response_raises_naming_the_record(tok):
    long_prompt = [Message("user", "word " * 200), Message("assistant", "ok")]
    with pytest.raises(DataError, match=r"record 'rec-7'.*field 'messages'.*no response token"):
        encode_messages(long_prompt, tok, TokenizeConfig(max_length=16, truncation="keep_start"), record="rec-7")


def test_pair_truncation_keeps_response_and_prompt_end(tok):
    t = PreferenceTriple("t0", "s", [Message("user", "word " * 100)], "yes " * 50, "no")
    enc = encode_triple(t, tok, TokenizeConfig(max_length=40))
    for side in ("chosen", "rejected"):
        ids, labels = enc[side]["input_ids"], enc[side]["labels"]
        assert len(ids) <= 40 and sum(l != IGNORE_INDEX for l in labels) > 0
        assert labels[0] == IGNORE_INDEX  # some prompt survives
    assert sum(l != IGNORE_INDEX for l in enc["chosen"]["labels"]) <= 40 - 20


def test_collate_pads_both_sides_with_masked_labels():
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [8], "labels": [8]}
    right = collate([a, b], pad_id=0, padding_side="right")
    left = collate([a, b], pad_id=0, padding_side="left")
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["labels"].tolist()[1] == [-100, -100, 8]
    assert left["attention_mask"].tolist()[1] == [0, 0, 1]
    assert left["position_ids"].tolist()[1][2] == 0 and right["position_ids"].tolist()[1][0] == 0


def test_left_and_right_padding_give_the_same_logits(tiny_model_dir):
    from rose_select.modeling import load_model

    model = load_model(str(tiny_model_dir), dtype="float64")
    a = {"input_ids": list(range(10, 20)), "labels": list(range(10, 20))}
    b = {"input_ids": [30, 31, 32], "labels": [30, 31, 32]}
    with torch.no_grad():
        out = {}
        for side in ("left", "right"):
            batch = collate([a, b], pad_id=0, padding_side=side)
            batch.pop("labels")
            out[side] = model(**batch).logits
    torch.testing.assert_close(out["left"][1, -3:], out["right"][1, :3], rtol=1e-9, atol=1e-9)


def test_generation_prompt_ends_with_assistant_turn(tok):
    ids = encode_prompt(CONV[:1], tok, TokenizeConfig())
    text = tok.decode(ids)
    assert text.rstrip().endswith("assistant") or text.endswith("<|assistant|>\n")


def test_triple_labels_only_the_final_answer_of_a_multi_turn_prompt(tok):
    prompt = [Message("user", "Hi"), Message("assistant", "Hello there, how can I help you today?"),
              Message("user", "Tell me a fact " * 20)]
    t = PreferenceTriple("t1", "s", prompt, "Cats sleep a lot.", "No.")
    enc = encode_triple(t, tok, TokenizeConfig(max_length=48))
    assert _target_text(tok, enc["chosen"]).startswith("Cats sleep a lot.")
    assert _target_text(tok, enc["rejected"]).startswith("No.")
    assert enc["chosen"]["input_ids"] != enc["rejected"]["input_ids"]
