"""Rewards and costs on images: the reward interface, CLIP score, CLIP preprocessing in JAX, and the safety
cost model of SC-DPO.

A reward is any ``reward(images_uint8, prompts) -> (rewards [B], info)`` (``base``); ``WeightedSum`` combines
them, ``ClipScore`` is the CLIP cosine, ``cost_model.CostReward`` the safety cost, ``NudeNet`` the nudity
detector (NudeNet's ONNX model, batched on the host) and ``NudityReward`` its score as a reward.

``clip_preprocess.preprocess`` turns uint8 / [0, 1] NHWC images of any size into CLIP pixel values (a jit-able
approximation of transformers' CLIPImageProcessor). ``terms`` names the RL trainer's reward terms
(``REWARD_TERMS``) and builds its weighted reward from a config (``make_reward``). ``cost_model`` holds the
safety cost model ``C(x) = g_psi(normalize(CLIP_image(x)))`` and its save/load (its training step:
``train.cost_steps``).
"""
from sc_dpo_jax.rewards.base import WeightedSum, brightness, check_output
from sc_dpo_jax.rewards.clip_preprocess import CLIP_MEAN, CLIP_STD, preprocess, resize_output_size
from sc_dpo_jax.rewards.clip_score import ClipScore, clip_cosine
from sc_dpo_jax.rewards.nudenet import (DEFAULT_EXPOSED, DEFAULT_THRESHOLD, LABELS, NudeNet, NudityReward,
                                        max_class_scores)
from sc_dpo_jax.rewards.cost_model import (CostAdapter, CostReward, SafetyCostModel, embed_in_batches,
                                           load_cost_model, save_cost_model)

__all__ = ["WeightedSum", "brightness", "check_output", "ClipScore", "clip_cosine", "CostReward", "CLIP_MEAN", "CLIP_STD", "preprocess", "resize_output_size", "CostAdapter",
           "SafetyCostModel", "embed_in_batches", "load_cost_model", "save_cost_model", "DEFAULT_EXPOSED", "DEFAULT_THRESHOLD", "LABELS",
           "NudeNet", "NudityReward", "max_class_scores"]
