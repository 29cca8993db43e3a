"""Fused Triton kernels with plain-torch references (imported as ``auraflow_edge.kernels``).

This folder sits at the repository root, so wherever the root is first on ``sys.path``
(``python -m pytest``, ``python -c``, ``python3 - <<EOF``, Ray workers started from the root)
a plain ``import kernels`` finds it before Hugging Face's ``kernels`` package, which transformers
imports. When that happens, the code below hands the import over to the installed package, so
dependencies keep working from any folder; this project never imports itself as ``kernels``.
"""

if __name__ == "kernels":  # found as a top-level name: not our package, someone wants HF's `kernels`

    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
        spec = importlib.machinery.PathFinder.find_spec(__name__, path)
        if spec is None or spec.loader is None:
            raise ImportError(
                f"'import kernels' found AuraFlow Edge's folder {root}/kernels (the repository root is "
                "on sys.path) and no installed 'kernels' package: install it (pip install kernels) or "
                "run from another folder (or with python -P)"
            )
        module = importlib.util.module_from_spec(spec)
        sys.modules[__name__] = module  # the import statement returns what sys.modules holds
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[__name__]
            raise

    _hand_over()
