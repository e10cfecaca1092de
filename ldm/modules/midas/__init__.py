"""MiDaS DPT-Hybrid depth estimation for Stable Diffusion 2 depth-to-image (SAI2 ``ldm/modules/midas``).

* :class:`ldm.modules.midas.api.MiDaSInference`: the ``depth_model`` network (weights from the checkpoint);
* :mod:`ldm.modules.midas.transforms`: its input transform and the depth post-processing of the scripts.
"""
