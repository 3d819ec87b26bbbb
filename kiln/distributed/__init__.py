"""Past one process: multi-host engines in lockstep (init, lockstep) and data-parallel replicas on Ray
(kiln/serving/ray_*.py, kiln/entrypoints/batch_ray.py)."""
