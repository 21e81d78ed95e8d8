"""The bundled demo VLM: a synthetic visual world, a small LLaVA model trained on it, and its checkpoint.

``casp.demo.world`` generates images and questions; ``casp.demo.model`` builds and loads the model
(``build_demo_model``, ``load_demo_model``, ``DEMO_MODEL_DIR``); ``python -m casp.demo.train`` trains it.
"""
