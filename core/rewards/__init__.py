"""Reward models behind one interface (:class:`RewardModel`): ``score(images, prompts) -> (B,)``, higher = better.

Formats, each loaded offline from local files: CLIPScore on any open_clip model, HPSv2 / HPSv2.1, PickScore, the LAION
aesthetic heads, and our own trained rewards ("reward-clip/1"). :func:`load_reward_model` dispatches on a kind or
detects it from the file layout. Aggregating several rewards into rankings is :mod:`..reward_aggregation`.
"""

from .aesthetic import AestheticReward, load_aesthetic
from .base import REWARD_KINDS, RewardModel
from .clip_score import CLIP_SCORE_WEIGHT, ClipScoreReward, OpenClipReward, load_clip_score
from .hpsv2 import HPSv2Reward, load_hpsv2
from .loading import detect_reward_kind, load_reward_model
from .pickscore import PickScoreReward, load_pickscore
from .preprocessing import ImagePreprocess
from .trained import REWARD_FORMAT, TrainedClipReward, load_trained_reward, save_trained_reward

__all__ = [
    "CLIP_SCORE_WEIGHT",
    "REWARD_FORMAT",
    "REWARD_KINDS",
    "AestheticReward",
    "ClipScoreReward",
    "HPSv2Reward",
    "ImagePreprocess",
    "OpenClipReward",
    "PickScoreReward",
    "RewardModel",
    "TrainedClipReward",
    "detect_reward_kind",
    "load_aesthetic",
    "load_clip_score",
    "load_hpsv2",
    "load_pickscore",
    "load_reward_model",
    "load_trained_reward",
    "save_trained_reward",
]
