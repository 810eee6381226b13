"""P-tuning's template (issue #16, defect 5): several blocks of virtual tokens and anchor tokens
interleaved with the prompt style's parts, ``[P_0:i] x [P_i+1:j] y ...`` (Liu et al. 2021, sec. 3.2),
one prompt encoder for all of them; with padding, generation, the KV cache, save/load and config files."""

from __future__ import annotations

import method_helpers as helpers
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from litpeft.errors import LitPeftError
from litpeft.methods import PeftMethod, PTuning, adapters_disabled
from litpeft.methods.template import Block, layout
from litpeft.module import PeftLM

USER, END, ASSISTANT = "<|im_start|>user\n", "<|im_end|>", "<|im_start|>assistant\n"
CHATS = [
    f"{USER}What is 2 + 2{END}\n{ASSISTANT}4",
    f"{USER}Hi{END}\n{ASSISTANT}Hello! How can I help?",
    f"{USER}Name a color.{END}\n{ASSISTANT}Blue",
]
PROMPTS = [c[: c.index(ASSISTANT) + len(ASSISTANT)] for c in CHATS]
TEMPLATE = [
    {"tokens": 2},  # [P_0:2] before the sample
    {"tokens": 1, "after": USER},  # [P_2:3] before the question x
    {"tokens": 2, "anchor": "?", "before": END},  # [P_3:5] ? after x: the paper's anchor
    {"tokens": 1, "after": ASSISTANT},  # [P_5:6] before the answer y
]
N = 6


def template_method(template: list | None = None, **kw) -> PTuning:
    return PTuning(
        num_virtual_tokens=N,
        placement="template",
        template=template or TEMPLATE,
        tokenizer="tiny:llama",
        **kw,
    )


def wrapped(arch: str, tok, method: PTuning | None = None):
    return helpers.seeded_model(arch, tok, method or template_method(), noise=0.3)


def reference_logits(model, tok, text: str) -> torch.Tensor:
    """The template built by hand: virtual blocks and the anchor's embedding spliced into the text."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = enc(text)
    a = text.index(USER) + len(USER)
    b = text.index(END)
    c = text.index(ASSISTANT) + len(ASSISTANT)
    cuts = [len(enc(text[:a])), len(enc(text[:b])), len(enc(text[:c]))]
    assert enc(text[:a]) + enc(text[a:b]) + enc(text[b:c]) + enc(text[c:]) == ids  # the cuts are exact
    table = model.get_input_embeddings()
    v = model.prompt_encoder.virtual_tokens()
    e = table(torch.tensor(ids))
    anchor = table(torch.tensor(enc("?")))
    pieces = [v[:2], e[: cuts[0]], v[2:3], e[cuts[0] : cuts[1]], v[3:5], anchor, e[cuts[1] : cuts[2]]]
    pieces += [v[5:6], e[cuts[2] :]]
    seq = torch.cat(pieces)
    is_real = torch.cat([torch.full((len(p),), k in (1, 3, 6, 8)) for k, p in enumerate(pieces)])
    with adapters_disabled(model):
        logits = model(inputs_embeds=seq[None]).logits[0]
    return logits[is_real]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_template_follows_the_paper_layout(arch, tok):
    model = wrapped(arch, tok)
    with torch.no_grad():
        for text in CHATS:
            ours = model(**helpers.batch_of(tok, [text])).logits[0]
            torch.testing.assert_close(ours, reference_logits(model, tok, text), atol=1e-5, rtol=1e-5)


def test_one_encoder_feeds_every_block(tok):
    """The paper's single prompt encoder (a BiLSTM over all N inputs): every block's gradient reaches it,
    and a change of one input moves the virtual tokens of other blocks too."""
    model = wrapped("llama", tok)
    enc = model.prompt_encoder
    assert enc.virtual_tokens().shape == (N, model.config.hidden_size)
    before = enc.virtual_tokens().detach().clone()
    with torch.no_grad():
        enc.embedding.weight[0].add_(1.0)  # an input of the first block only
    moved = (enc.virtual_tokens().detach() - before).abs().amax(-1) > 0
    assert moved[5]  # the last block's token depends on it (bidirectional LSTM)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_rows_equal_the_rows_alone(arch, side, tok):
    helpers.assert_padded_rows_equal_rows_alone(wrapped(arch, tok), tok, CHATS, side)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_and_without_cache_agree_and_rows_generate_as_alone(arch, tok):
    model = wrapped(arch, tok).eval()
    enc = helpers.batch_of(tok, PROMPTS, side="left")
    cached = helpers.greedy_with_cache_equals_without(model, enc, tok.pad_token_id, 8)
    helpers.assert_rows_generate_as_alone(model, tok, PROMPTS, enc, cached, 8)


def test_rows_of_different_extended_lengths_generate_as_alone(tok):
    """``occurrence: every`` puts a block at each turn: rows with more turns get more tokens inserted."""
    template = [{"tokens": 2}, {"tokens": 2, "after": ASSISTANT}]  # every assistant header
    method = PTuning(num_virtual_tokens=4, placement="template", template=template, tokenizer="tiny:llama")
    model = wrapped("llama", tok, method).eval()
    prompts = [PROMPTS[0], f"{CHATS[1]}{END}\n{USER}And you?{END}\n{ASSISTANT}"]
    enc = helpers.batch_of(tok, prompts, side="left")
    cached = helpers.greedy_with_cache_equals_without(model, enc, tok.pad_token_id, 6)
    helpers.assert_rows_generate_as_alone(model, tok, prompts, enc, cached, 6)
    helpers.assert_padded_rows_equal_rows_alone(model, tok, prompts, "right")


def test_layout_places_blocks_at_every_first_or_last_occurrence():
    ids = torch.tensor([[1, 2, 9, 3, 9, 4]])
    n = 2  # the virtual tokens are sources 6 and 7 (after the 6 real tokens); the pad slot is 8
    for occurrence, order in [
        ("every", [6, 0, 1, 2, 7, 3, 4, 7, 5]),
        ("first", [6, 0, 1, 2, 7, 3, 4, 5]),
        ("last", [6, 0, 1, 2, 3, 4, 7, 5]),
    ]:
        blocks = [Block((0, 1)), Block((1, 2), marker=(9,), occurrence=occurrence, label="b")]
        lay = layout(blocks, n, ids, None, None, 1, 6, 512, ids.device)
        assert lay.order[0].tolist() == order, occurrence
        assert lay.positions[0].tolist() == list(range(len(order)))
    # before a marker; a packed row: two samples (positions restart), each gets the blocks
    blocks = [Block((0, 1), marker=(9,), after=False, label="b"), Block((1, 2), label="s")]
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    lay = layout(blocks, n, torch.tensor([[1, 9, 2, 3, 9, 4]]), None, pos, 1, 6, 512, ids.device)
    assert lay.order[0].tolist() == [7, 0, 6, 1, 2, 7, 3, 6, 4, 5]
    assert lay.positions[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert lay.mask is None and lay.shift.tolist() == [2]


def test_an_optional_block_is_left_out_where_its_text_is_missing(tok):
    """Alpaca rows without an input have no ``### Input:`` section: ``required: false`` skips the block."""
    template = [{"tokens": 2}, {"tokens": 2, "after": "### Input:\n", "required": False}]
    method = PTuning(num_virtual_tokens=4, placement="template", template=template, tokenizer="tiny:llama")
    model = wrapped("llama", tok, method)
    texts = [
        "### Instruction:\nAdd\n\n### Input:\n2 2\n\n### Response:\n4",
        "### Instruction:\nHi\n\n### Response:\n",
    ]
    helpers.assert_padded_rows_equal_rows_alone(model, tok, texts, "right")
    strict = [{"tokens": 2}, {"tokens": 2, "after": "### Input:\n"}]
    method = PTuning(num_virtual_tokens=4, placement="template", template=strict, tokenizer="tiny:llama")
    with pytest.raises(LitPeftError, match=r"template block 1 \(after '### Input:\\n'\) .* not found"):
        wrapped("llama", tok, method)(**helpers.batch_of(tok, texts))


def test_adapter_directory_round_trip(tmp_path, tok):
    from litpeft.adapter_dir import load_adapter, save_adapter

    module = PeftLM(model="tiny:llama", method=template_method(encoder="mlp"))
    module.configure_model()
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_adapter(tmp_path, module)
    saved = yaml.safe_load((tmp_path / "adapter.yaml").read_text())
    assert "template" in yaml.safe_dump(saved)
    model, _, loaded, _ = load_adapter(tmp_path)
    assert isinstance(loaded, PTuning) and loaded.config() == module.method.config()
    enc = helpers.batch_of(tok, CHATS)
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, module.model.eval()(**enc).logits, atol=1e-6, rtol=0)


def test_peft_export_is_refused_with_one_line(tok):
    method = template_method()
    reason = method.peft_refusal()
    assert reason is not None and "\n" not in reason and "template" in reason and "prepends" in reason
    with pytest.raises(LitPeftError, match="no peft equivalent"):
        method.to_peft(wrapped("llama", tok, method), {})
    assert PTuning().peft_refusal() is None  # the prefix form still exports


def test_the_template_is_typed_config():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--method", type=PeftMethod)
    config = {
        "method": {
            "class_path": "litpeft.methods.PTuning",
            "init_args": {"num_virtual_tokens": N, "placement": "template", "template": TEMPLATE},
        }
    }
    method = parser.instantiate_classes(parser.parse_string(yaml.safe_dump(config))).method
    assert isinstance(method, PTuning) and method.template == TEMPLATE
    bad = yaml.safe_dump(config).replace("tokens: 2", "tokens: two", 1)
    with pytest.raises(Exception, match="tokens"):
        parser.parse_string(bad)


def test_bad_templates():
    with pytest.raises(LitPeftError, match="set num_virtual_tokens: 6"):
        PTuning(num_virtual_tokens=20, placement="template", template=TEMPLATE)
    with pytest.raises(LitPeftError, match="non-empty template"):
        PTuning(placement="template")
    with pytest.raises(LitPeftError, match="not both"):
        PTuning(
            num_virtual_tokens=1, placement="template", template=[{"tokens": 1, "after": "a", "before": "b"}]
        )
    with pytest.raises(LitPeftError, match="inserts nothing"):
        PTuning(num_virtual_tokens=1, placement="template", template=[{"tokens": 1}, {"after": "a"}])
    with pytest.raises(LitPeftError, match="keys among"):
        PTuning(num_virtual_tokens=1, placement="template", template=[{"tokens": 1, "where": "a"}])
    with pytest.raises(LitPeftError, match="placement='template' only"):
        PTuning(num_virtual_tokens=1, template=[{"tokens": 1}])
