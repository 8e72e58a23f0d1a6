"""StepLayout (jserve/step_buffers.py): the int32 and float32 host buffers are views of one
int32 array the step takes as its one input, and the step's split gives back both exactly."""

import jax
import numpy as np
import pytest

from jserve.step_buffers import StepLayout


def test_joint_buffer_round_trips_both_views():
    layout = StepLayout(num_tokens=16, num_rows=4, pages_per_seq=8, page_size=16)
    ibuf, fbuf, f = layout.new_buffers()
    f["token_ids"][:3] = [7, 8, 9]
    f["presence_penalty"][1] = -0.375
    f["repetition_penalty"][2] = np.float32(np.nan)
    joint = layout.joint(ibuf)
    assert joint.dtype == np.int32 and joint.shape == (layout.int_size + layout.float_size,)
    i2, f2 = jax.jit(layout.split)(joint)
    np.testing.assert_array_equal(np.asarray(i2), ibuf)
    np.testing.assert_array_equal(np.asarray(f2), fbuf)   # NaN bits survive the bitcast too
    assert layout.read(np.asarray(i2), "token_ids")[:3].tolist() == [7, 8, 9]
    # Fresh buffers each call: filling one step's buffers never touches the next one's.
    ibuf2, _, f_next = layout.new_buffers()
    assert f_next["token_ids"][0] == 0 and layout.joint(ibuf2) is not joint


def test_joint_rejects_a_buffer_that_is_not_its_view():
    layout = StepLayout(num_tokens=16, num_rows=4, pages_per_seq=8, page_size=16)
    with pytest.raises(ValueError, match="new_buffers"):
        layout.joint(np.zeros(layout.int_size, np.int32))
    other = StepLayout(num_tokens=32, num_rows=8, pages_per_seq=8, page_size=16)
    with pytest.raises(ValueError, match="new_buffers"):
        layout.joint(other.new_buffers()[0])
