"""The drawn set (issue 26): deterministic from its seed, prompts that parse back to their labels."""

import numpy as np
import pytest

from sdbuild import drawn


def test_set_is_deterministic_from_seed():
    a, la = drawn.dataset(3, 24)
    b, lb = drawn.dataset(3, 24)
    c, _ = drawn.dataset(4, 24)
    assert a.shape == (24, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and la == lb
    assert not np.array_equal(a, c)


def test_image_shows_its_colours():
    images, labels = drawn.dataset(0, 40)
    for im, lab in zip(images, labels):
        corner = tuple(int(v) for v in im[0, 0])
        assert corner == drawn.COLOURS[drawn.COLOUR_NAMES[lab.background]]
        fg = np.array(drawn.COLOURS[drawn.COLOUR_NAMES[lab.colour]])
        assert (np.abs(im.reshape(-1, 3).astype(int) - fg).sum(1) < 10).sum() > 20  # the digit is drawn


def test_prompts_round_trip_and_bad_prompts_are_refused():
    for lab in drawn.all_labels():
        assert drawn.parse_prompt(lab.prompt) == lab
    for bad in ("a red cat", "a red 7 on a red background", "a pink 7 on a blue background"):
        with pytest.raises(ValueError, match="not a drawn-set prompt"):
            drawn.parse_prompt(bad)
