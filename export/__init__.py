"""ONNX export (`dglm.export.onnx`: bundle → validated graphs + manifest) and the ONNX Runtime
backend (`dglm.export.runtime`: the graphs as the Engine's networks and a decode-loop step backend,
`Engine.from_pretrained(OUTDIR, backend="onnx")`)."""
