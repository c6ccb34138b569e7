"""How sequences start and end for each tokenizer family: real tokenizer classes on a tiny
character vocabulary, built offline and saved/reloaded as a model directory holds them."""
from __future__ import annotations

import string
from dataclasses import replace

import pytest

from layercard.config import load_config
from layercard.data.examples import (LEGACY_SEQUENCE_FORMAT, DataConfig, check_sequence_format, sequence_format,
                            tokenize_record)
from layercard.errors import LayercardError
from layercard.train.label_loss import answer_token_ids
from layercard.data.tokenizer import ByteTokenizer, HFTokenizer

CHARS = string.ascii_letters + string.digits + " .,:;!?'\"-()<>/|_\n"
# The families' own special tokens and defaults: Llama and Gemma add a BOS, Qwen2 and GPT-2 do not.
FAMILIES = {
    "llama": ("LlamaTokenizerFast", ["<unk>", "<s>", "</s>"], "▁", dict(add_bos_token=True)),
    "gemma": ("GemmaTokenizerFast", ["<pad>", "<eos>", "<bos>", "<unk>"], "▁", dict(add_bos_token=True)),
    "qwen2": ("Qwen2TokenizerFast", ["<|endoftext|>"], "Ġ", {}),
    "gpt2": ("GPT2TokenizerFast", ["<|endoftext|>"], "Ġ", {}),
}
ADDS_BOS = {"llama", "gemma"}
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
RECORD = {"prompt": "Review: sharp and funny.\nSentiment:", "answer": " positive", "text": "A plain document."}
PA = dict(prompt_column="prompt", answer_column="answer")


def build_tokenizer(family: str, chat_template: str | None = None):
    """The family's tokenizer class on a one-character-per-token vocabulary (no merges)."""
    import transformers

    cls_name, specials, space, defaults = FAMILIES[family]
    vocab = {s: i for i, s in enumerate(specials)}
    for c in CHARS:
        vocab.setdefault(space if c == " " else ("Ċ" if c == "\n" and space == "Ġ" else c), len(vocab))
    tok = getattr(transformers, cls_name)(vocab=vocab, merges=[], **defaults)
    if chat_template:
        tok.chat_template = chat_template
    return tok


def saved_tokenizer(family: str, path, chat_template: str | None = None) -> HFTokenizer:
    """Saved and loaded back: a saved tokenizer keeps its BOS in the post-processor only
    (``add_bos_token`` reads False after loading), which is what a model directory holds."""
    build_tokenizer(family, chat_template).save_pretrained(path)
    return HFTokenizer.from_dir(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, saved_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def specials_of(tok: HFTokenizer) -> set[int]:
    return set(tok.tok.all_special_ids)


def test_start_tokens_are_the_familys_bos(family):
    name, tok = family
    assert tok.start_ids == ([tok.tok.bos_token_id] if name in ADDS_BOS else [])
    assert tok.tok.add_bos_token is False   # why the start is read from what the tokenizer does, not the flag


@pytest.mark.parametrize("cfg", [DataConfig(**PA), DataConfig()], ids=["prompt-answer", "text"])
def test_one_bos_at_position_0_and_no_other_special_token(family, cfg):
    name, tok = family
    ex = tokenize_record(RECORD, tok, cfg)
    ids, specials = ex["input_ids"], specials_of(tok)
    if name in ADDS_BOS:
        assert ids[0] == tok.tok.bos_token_id and ids.count(tok.tok.bos_token_id) == 1
        assert ex["labels"][0] == -100
        ids = ids[1:]
    assert not specials & set(ids), [tok.token_name(i) for i in ids if i in specials]


@pytest.mark.parametrize("answer_eos", [False, True])
def test_answer_tokens_are_the_answers_own_then_eos_only_when_asked(family, answer_eos):
    _, tok = family
    ex = tokenize_record(RECORD, tok, DataConfig(**PA, answer_eos=answer_eos))
    supervised = [t for t in ex["labels"] if t != -100]
    answer = tok.tok.encode(RECORD["answer"], add_special_tokens=False)
    assert supervised == answer + ([tok.eos_id] if answer_eos else [])
    assert ex["input_ids"][-len(supervised):] == supervised
    prompt = tok.tok.encode(RECORD["prompt"], add_special_tokens=False)
    assert ex["input_ids"][len(tok.start_ids):-len(supervised)] == prompt


def test_truncation_keeps_the_bos_and_the_answer_and_cuts_the_prompts_start(family):
    name, tok = family
    ex = tokenize_record(RECORD, tok, DataConfig(**PA, max_seq_len=12, answer_eos=True))
    ids = ex["input_ids"]
    answer = tok.tok.encode(RECORD["answer"], add_special_tokens=False) + [tok.eos_id]
    prompt = tok.tok.encode(RECORD["prompt"], add_special_tokens=False)
    start = len(tok.start_ids)
    assert len(ids) == 12 and ids[:start] == tok.start_ids and ids[-len(answer):] == answer
    assert ids[start:-len(answer)] == prompt[-(12 - start - len(answer)):]   # the prompt's end, kept
    text = tokenize_record(RECORD, tok, DataConfig(max_seq_len=5))["input_ids"]
    assert len(text) == 5 and text[:start] == tok.start_ids
    assert text[start:] == tok.tok.encode(RECORD["text"], add_special_tokens=False)[:5 - start]


def test_chat_template_supervises_only_the_assistant_turn(tmp_path):
    tok = saved_tokenizer("llama", tmp_path, chat_template=CHAT)
    cfg = DataConfig(**PA, chat_template=True, answer_eos=True)
    ex = tokenize_record(RECORD, tok, cfg)
    ids, labels = ex["input_ids"], ex["labels"]
    bos, eos = tok.tok.bos_token_id, tok.eos_id
    assert ids[0] == bos and ids.count(bos) == 1        # the template's BOS, not a second one
    n_prompt = labels.count(-100)
    assert labels[:n_prompt] == [-100] * n_prompt and -100 not in labels[n_prompt:]
    head = tok.tok.decode(ids[:n_prompt])
    assert head == f"<s><|user|>{RECORD['prompt']}</s><|assistant|>"
    # the assistant's tokens: the answer, then the template's end of turn (the EOS: not added twice)
    assert labels[n_prompt:] == tok.tok.encode(RECORD["answer"], add_special_tokens=False) + [eos]
    fmt = sequence_format(tok, cfg)
    assert fmt["bos_id"] == bos and fmt["answer_eos"] is True and len(fmt["chat_template"]) == 16


def test_chat_template_without_a_template_names_the_tokenizer(tmp_path):
    tok = saved_tokenizer("qwen2", tmp_path)
    with pytest.raises(LayercardError, match=f"tokenizer '{tmp_path}' has no chat template"):
        tokenize_record(RECORD, tok, DataConfig(**PA, chat_template=True))
    with pytest.raises(LayercardError, match="byte tokenizer .* has no chat template"):
        tokenize_record(RECORD, ByteTokenizer(256), DataConfig(**PA, chat_template=True))
    with pytest.raises(LayercardError, match="data.chat_template needs prompt/answer data"):
        DataConfig(chat_template=True)


def test_shared_first_answer_token_is_named(tmp_path):
    tok = saved_tokenizer("gpt2", tmp_path)
    assert answer_token_ids(tok, ["negative", "positive"]) == [tok.tok.convert_tokens_to_ids(c) for c in "np"]
    shared = r"answers share a first token \(' negative' → 'Ġ' \(\d+\), ' positive' → 'Ġ'"
    with pytest.raises(LayercardError, match=shared):
        answer_token_ids(tok, [" negative", " positive"])


def legacy_tokenize(record: dict, tokenizer, cfg: DataConfig) -> dict:
    """tokenize_record as it was before sequence starts and answer EOS existed (no special tokens at all)."""
    if cfg.prompt_column:
        prompt = tokenizer.encode(str(record[cfg.prompt_column]))
        answer = tokenizer.encode(str(record[cfg.answer_column]))[: cfg.max_seq_len - 1]
        prompt = prompt[-(cfg.max_seq_len - len(answer)):]
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}
    ids = tokenizer.encode(str(record[cfg.text_column]))[: cfg.max_seq_len]
    return {"input_ids": ids, "labels": list(ids)}


def committed_task_data() -> dict[str, DataConfig]:
    """The data sections of the committed SmolLM2 configs (the sentiment task, label loss) and of the
    benchmarks' headline task (LM loss, its results measured without an EOS), as the pipelines resolve them."""
    from layercard.profile.config import ProfileConfig
    from layercard.search.config import SearchConfig
    from layercard.train.config import TrainConfig
    from layercard.data.task_recipes import TASKS

    headline = TASKS["headline"]
    profile = load_config(ProfileConfig, "configs/profile-smollm2.yaml")
    train = load_config(TrainConfig, "configs/train-smollm2.yaml", ["strategy=all", "selection=null"])
    search = load_config(SearchConfig, "configs/search-smollm2.yaml").train_config
    head_profile = load_config(ProfileConfig, "configs/profile-smollm2.yaml", headline["profile"])
    head_search = load_config(SearchConfig, "configs/search-smollm2.yaml", headline["train"]).train_config
    assert head_profile.profile.loss == head_search.loss == "lm"
    return {"profile": profile.data, "train": train.data, "train.eval": train.eval_data,
            "search.train": search.data, "search.eval": search.eval_data, "headline.profile": head_profile.data,
            "headline.train": head_search.data, "headline.eval": head_search.eval_data}


@pytest.mark.parametrize("which", ["bytes", "qwen2", "gpt2"])
def test_committed_configs_build_the_same_sequences_as_before(which, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    tok = ByteTokenizer(49152) if which == "bytes" else saved_tokenizer(which, tmp_path)
    long = {"prompt": "Review: " + "a long and winding review, " * 20 + "\nSentiment:", "answer": " negative"}
    for name, cfg in committed_task_data().items():
        assert cfg.answer_eos is False and not cfg.chat_template, name
        assert sequence_format(tok, cfg) == LEGACY_SEQUENCE_FORMAT, name
        check_sequence_format(None, sequence_format(tok, cfg), "an old card")   # old cards stay usable
        for record in (RECORD, long):
            for c in (cfg, replace(cfg, max_seq_len=16)):
                assert tokenize_record(record, tok, c) == legacy_tokenize(record, tok, c), name


def test_a_card_built_another_way_is_refused(tmp_path):
    tok = saved_tokenizer("llama", tmp_path)
    have = sequence_format(tok, DataConfig(**PA, answer_eos=False))
    assert have == {"bos_id": 1, "answer_eos": False, "chat_template": None}
    check_sequence_format(dict(have), have, "card 'c'")
    with pytest.raises(LayercardError, match="card 'c' was built from sequences with bos_id=None, "
                                              "this data gives bos_id=1"):
        check_sequence_format(None, have, "card 'c'")
    with pytest.raises(LayercardError, match="answer_eos=True.*set data.answer_eos=true"):
        check_sequence_format({**have, "answer_eos": True}, have, "card 'c'")


# --------------------------------------------------------------------------- a BOS-adding model end to end
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 32) and its BOS-adding tokenizer, saved as a model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama")
    tok = build_tokenizer("llama")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_profile_select_and_train_a_bos_model_through_the_cli(llama_dir, tmp_path, ray_local, monkeypatch, capsys):
    import json
    from pathlib import Path

    from layercard.card.layer_card import LayerCard
    from pipelines import cli

    monkeypatch.chdir(Path(__file__).resolve().parents[2])   # the configs name their data from the repository root
    model = ["model.config=null", f"model.path={llama_dir}"]
    card, sel, out = tmp_path / "card", tmp_path / "sel", tmp_path / "train"
    assert cli.main(["profile", "--config", "configs/tiny.yaml", "--out", str(card), *model, "cost.measure=false",
                     "data.num_samples=16", "coupling.probe_samples=8"]) == 0
    meta = LayerCard.load(card, with_stats=False).meta
    assert meta["sequences"] == {"bos_id": 1, "answer_eos": True, "chat_template": None}
    assert json.loads((card / "card.json").read_text())["sequences"]["bos_id"] == 1
    assert cli.main(["select", str(card), "--out", str(sel), "--k", "1"]) == 0
    assert json.loads((sel / "selection.json").read_text())["sequences"] == meta["sequences"]

    train = ["train", "--config", "configs/train-tiny.yaml", *model, f"selection={sel}", "steps=2", "batch_size=2",
             "warmup_steps=1", "report_every=1", "checkpoint_every=2", f"storage_path={tmp_path / 'ray'}"]
    capsys.readouterr()
    assert cli.main([*train, "--out", str(tmp_path / "refused"), "data.answer_eos=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "answer_eos=True, this data gives answer_eos=False" in err
    assert cli.main([*train, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["train_loss_history"]) == 2
    assert all(0 < loss < 10 for loss in metrics["train_loss_history"])
    assert (out / "adapter" / "adapter_config.json").is_file()
