"""Research and evaluation tooling, outside the serving path.

* ``hf_eval``, ``hf_reference``, ``hf_multiturn``: the Hugging Face reference harness (the server's
  plan recomputed and applied in transformers; greedy decoding; multi-turn);
* ``tasks``: the synthetic document-VQA task and its datasets;
* ``tinyvlm``: the bundled model's assets, training and evaluation.

Nothing the SGLang server imports (``plugin``, ``radix_cache``, ``backend``, ``policy``) imports this
package; ``tests/unit/test_layout.py`` checks that.
"""
