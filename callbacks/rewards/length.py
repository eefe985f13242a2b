"""Length reward Rlen_k (METHOD.md): 0.2 for a correct, well-formed segment of a sensible length.

The bounds are inclusive, in tokens of the segment (tags included, EOS in reasoning). Video-R1's
length reward, the model for this one, also requires more than one correct sample in the group;
METHOD.md does not, and neither do we.
"""

from __future__ import annotations

LENGTH_BONUS = 0.2
PERCEPTION_LENGTH_RANGE = (128, 320)
REASONING_LENGTH_RANGE = (320, 512)


def length_reward(accuracy: float, format_score: float, num_tokens: int, lmin: int, lmax: int) -> float:
    """0.2 when ``accuracy > 0`` and ``format_score > 0`` and ``lmin <= num_tokens <= lmax``, else 0.

    A NaN accuracy (an unjudged sample) fails ``> 0`` and gets 0.

    >>> length_reward(1.0, 1.0, 200, *PERCEPTION_LENGTH_RANGE)
    0.2
    >>> length_reward(1.0, 1.0, 321, *PERCEPTION_LENGTH_RANGE)
    0.0
    """
    return LENGTH_BONUS if accuracy > 0 and format_score > 0 and lmin <= num_tokens <= lmax else 0.0
