"""Checkpoint files: streaming Gram equals W W^T, and every malformed file is refused by name."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import pytest
import torch

from z0inf_pipeline.errors import InputError
from z0inf_pipeline.influence import gram_matrix, open_checkpoints, save_checkpoint

from .conftest import SHAPES, flatten


def test_checkpoints_are_read_in_step_order_with_metadata(checkpoint_dir):
    folder, _ = checkpoint_dir(T=4)
    ckpts = open_checkpoints(folder)
    assert [c.step for c in ckpts] == [0, 10, 20, 30]
    assert [c.learning_rate for c in ckpts] == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])
    assert [c.epoch for c in ckpts] == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("max_elements", [1, 6, 1 << 22])
def test_streaming_gram_equals_in_memory_w_wt(checkpoint_dir, max_elements):
    folder, states = checkpoint_dir(T=6)
    W = torch.stack([flatten(s, SHAPES) for s in states])
    G = gram_matrix(folder, center=False, max_elements=max_elements)
    torch.testing.assert_close(G, W @ W.T, rtol=1e-12, atol=1e-12)
    Wc = W - W[0]
    torch.testing.assert_close(gram_matrix(folder, max_elements=max_elements), Wc @ Wc.T, rtol=1e-12, atol=1e-12)


def test_tensor_and_file_sources_agree(checkpoint_dir):
    folder, states = checkpoint_dir(T=3)
    W = torch.stack([flatten(s, SHAPES) for s in states])
    torch.testing.assert_close(gram_matrix(W, max_elements=5), gram_matrix(folder), rtol=1e-12, atol=1e-12)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_pickle_file_is_refused_without_being_unpickled(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir(T=3)
    sentinel = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    bad = _write(folder / "ckpt-999.safetensors", pickle.dumps(Exploit()))
    with pytest.raises(InputError, match=f"{bad.name}.*pickle"):
        gram_matrix(folder)
    assert not sentinel.exists()
    zipped = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, zipped)
    with pytest.raises(InputError, match="legacy.pt.*pickle"):
        open_checkpoints([zipped])


def test_truncated_and_non_safetensors_files_are_refused(checkpoint_dir, tmp_path):
    folder, _ = checkpoint_dir(T=3)
    good = sorted(folder.glob("*.safetensors"))[1]
    truncated = _write(tmp_path / "cut.safetensors", good.read_bytes()[:-9])
    with pytest.raises(InputError, match="cut.safetensors: truncated"):
        open_checkpoints([truncated])
    text = _write(tmp_path / "notes.safetensors", b"these are not weights at all")
    with pytest.raises(InputError, match="notes.safetensors: not a safetensors file"):
        open_checkpoints([text])
    garbage_header = _write(tmp_path / "junk.safetensors", struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(InputError, match="junk.safetensors: not a safetensors file"):
        open_checkpoints([garbage_header])
    with pytest.raises(InputError, match="empty.safetensors: not a safetensors file"):
        open_checkpoints([_write(tmp_path / "empty.safetensors", b"")])


def test_checkpoint_without_step_metadata_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, str(tmp_path / "nostep.safetensors"))
    with pytest.raises(InputError, match="nostep.safetensors: metadata has no 'step'"):
        open_checkpoints(tmp_path)


def test_differing_shapes_and_missing_tensors_are_named(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(3, 2), "b": torch.ones(2)}, step=0)
    save_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(2, 3), "b": torch.ones(2)}, step=1)
    with pytest.raises(InputError, match=r"b.safetensors: tensor 'w' has shape \[2, 3\]"):
        gram_matrix(tmp_path)
    save_checkpoint(tmp_path / "b.safetensors", {"b": torch.ones(2)}, step=1)
    with pytest.raises(InputError, match="b.safetensors: has no tensor 'w'"):
        gram_matrix(tmp_path)


def test_duplicate_steps_unknown_patterns_and_nan_weights(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(3)}, step=5)
    save_checkpoint(tmp_path / "b.safetensors", {"w": torch.zeros(3)}, step=5)
    with pytest.raises(InputError, match="both claim step 5"):
        open_checkpoints(tmp_path)
    save_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([0.0, float("nan"), 1.0])}, step=6)
    with pytest.raises(InputError, match="b.safetensors: tensor 'w' holds NaN"):
        gram_matrix(tmp_path)
    with pytest.raises(InputError, match=r"parameter patterns \['head.\*'\] match no"):
        gram_matrix(tmp_path, parameters=["head.*"])


def test_mixed_dtypes_stream_like_their_float64_values(tmp_path):
    gen = torch.Generator().manual_seed(2)
    dtypes = {"a": torch.float16, "b": torch.bfloat16, "c": torch.float32, "d": torch.float64}
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 3), "d": (4,)}
    states = [{n: torch.randn(shapes[n], generator=gen).to(dtypes[n]) for n in dtypes} for _ in range(4)]
    for t, state in enumerate(states):
        save_checkpoint(tmp_path / f"m{t}.safetensors", state, step=t)
    W = torch.stack([flatten(s, dtypes) for s in states])
    for max_elements in (1, 4, 100):
        torch.testing.assert_close(gram_matrix(tmp_path, center=False, max_elements=max_elements), W @ W.T, rtol=1e-12, atol=1e-12)


def test_safetensors_whose_header_length_starts_with_a_pickle_byte_is_accepted(tmp_path):
    """A header of 128 (mod 256) bytes makes a valid file start with 0x80, pickle's opcode."""
    for pad in range(300):
        path = save_checkpoint(tmp_path / "c.safetensors", {"w": torch.ones(2)}, step=0, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    assert open_checkpoints([path])[0].step == 0


def test_a_tensor_stored_in_another_dtype_is_refused_not_misread(tmp_path):
    save_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(4), "v": torch.ones(2)}, step=0)
    save_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(4, dtype=torch.float16), "v": torch.ones(2)}, step=1)
    with pytest.raises(InputError, match="b.safetensors: tensor 'w' is stored as F16, but .*a.safetensors stores it as F32"):
        gram_matrix(tmp_path)


def test_negative_data_offsets_are_refused(tmp_path):
    path = save_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(4)}, step=0)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + header_len].replace(b'"data_offsets":[0,16]', b'"data_offsets":[-16,0]')
    assert header != raw[8 : 8 + header_len]
    header = header.ljust(header_len)  # same length, so the data section stays where it was
    bad = _write(tmp_path / "neg.safetensors", raw[:8] + header + raw[8 + header_len :])
    with pytest.raises(InputError, match=r"neg.safetensors: tensor 'w' has invalid data offsets \[-16, 0\]"):
        open_checkpoints([bad])
