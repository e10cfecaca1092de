"""Metrics over finished runs (their manifests): the SLD card's I2P inappropriateness table (:mod:`ldm.eval.i2p`)."""
