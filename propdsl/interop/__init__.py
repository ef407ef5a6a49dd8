"""Networks and properties made elsewhere, brought into propdsl.

* `propdsl.interop.onnx_import`: an ONNX network as a torch module (`load_onnx`) that the bound
  engine, the attacks and the Jacobian bounds accept; `onnx_forward` runs onnxruntime itself.
* `propdsl.interop.vnnlib`: VNN-LIB properties (1.0, and 2.0 through the `vnnlib` package) as
  verification problems (`read_vnnlib`).
* `propdsl.interop.competition`: VNN-COMP instances end to end (`solve_instance`, the answer
  in the competition's format, `sat` confirmed by onnxruntime) and whole benchmarks
  (`read_instances`, `run_instances`): what `propdsl vnnlib` runs.

None of them is imported by `import propdsl`: they load onnx, onnxruntime and torch on use.
"""
