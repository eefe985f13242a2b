"""Length rewards: VideoP2R's per-segment Rlen_k and Video-R1's whole-completion length control.

Rlen_k (METHOD.md, :func:`length_reward`): 0.2 for a correct, well-formed segment of a sensible
length; the bounds are inclusive, in tokens of the segment (tags included, EOS in reasoning).
Video-R1's length reward, the model for this one, also requires more than one correct sample in
the group; METHOD.md does not, and neither does Rlen_k. :func:`completion_length_rewards` is
Video-R1's own rule, for T-GRPO (configs/tgrpo.yaml).
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


COMPLETION_LENGTH_RANGE = (320, 512)


def completion_length_rewards(
    accuracies: list[float],
    lengths: list[int],
    group_size: int,
    lmin: int = COMPLETION_LENGTH_RANGE[0],
    lmax: int = COMPLETION_LENGTH_RANGE[1],
    bonus: float = LENGTH_BONUS,
    correct_threshold: float = 0.1,
) -> list[float]:
    """Video-R1's length control (``len_control`` in its GRPO trainer), one value per sample.

    Per group of ``group_size`` samples (Video-R1: the one prompt on a device): the samples whose
    accuracy exceeds ``correct_threshold`` count as correct; when MORE THAN ONE is correct, each
    correct sample whose whole completion has ``lmin <= tokens <= lmax`` (the end-of-turn token
    included, as Video-R1's completion mask counts it) gets ``bonus``. Accuracy is the plain
    answer accuracy, before any temporal bonus. A NaN accuracy is not correct.

    >>> completion_length_rewards([1.0, 1.0, 0.0, 1.0], [400, 600, 400, 320], group_size=4)
    [0.2, 0.0, 0.0, 0.2]
    >>> completion_length_rewards([1.0, 0.0, 0.0, 0.0], [400, 400, 400, 400], group_size=4)
    [0.0, 0.0, 0.0, 0.0]
    """
    if len(accuracies) != len(lengths) or group_size < 1 or len(lengths) % group_size:
        raise ValueError(f"{len(accuracies)} accuracies and {len(lengths)} lengths do not split into groups of {group_size}")
    values = [0.0] * len(lengths)
    for start in range(0, len(lengths), group_size):
        correct = [i for i in range(start, start + group_size) if accuracies[i] > correct_threshold]
        if len(correct) > 1:
            for i in correct:
                if lmin <= lengths[i] <= lmax:
                    values[i] = bonus
    return values
