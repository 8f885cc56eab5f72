# Quick start: `make demo` trains a small detector on generated data; `make test` runs every test.
# While developing, run `make check`: the tests not marked slow (no training subprocesses, torchrun,
# video or R50-FPN export), under 3 minutes on 2 CPU cores. CI (.ci/run) runs `make test`.
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test-only packages: pytest, onnx + onnxruntime for the ONNX export tests and tensorboard for --tensorboard (pyproject's "test" extra).
TEST_PACKAGES := pytest pytest-xdist onnx onnxruntime tensorboard

.PHONY: install demo check test benchmark

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt $(TEST_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

# Several processes share the cores in tests and the demo (loader workers, subprocess runs):
# idle OpenMP threads should sleep, not spin.
export OMP_WAIT_POLICY ?= PASSIVE

# Both tiers list their 25 slowest tests, so a test that grows slow is seen (and marked).
PYTEST := $(PY) -m pytest -q --durations=25 -n 2 --dist loadfile

check: $(STAMP)
	$(PYTEST) -m "not slow" tests

test: $(STAMP)
	$(PYTEST) tests

benchmark: $(STAMP)
	$(PY) tools/benchmark.py

# The demo: generated shapes dataset, a light MobileNetV2 detector trained from scratch on the CPU.
DEMO_DIR := data/demo
DEMO_OUT := save_weights/demo
DEMO_VOC := $(DEMO_DIR)/VOCdevkit/VOC2012
DEMO_FLAGS := --backbone-weights none --feature-stride 16 --representation-size 256 \
	--min-size 192 --max-size 192 -b 8 --workers 2 --epochs 8 --lr 0.02 --lr-steps 6 \
	--anchor-sizes 32,64,128 --box-batch-size-per-image 64 \
	--rpn-pre-nms-top-n-train 600 --rpn-post-nms-top-n-train 300 \
	--rpn-pre-nms-top-n-test 300 --rpn-post-nms-top-n-test 100 --print-freq 10

demo: $(STAMP)
	$(PY) tools/make_demo_voc.py --out $(DEMO_DIR)
	$(PY) train_mobilenet.py --data-path $(DEMO_DIR) --classes-json $(DEMO_DIR)/classes.json \
		--output-dir $(DEMO_OUT) $(DEMO_FLAGS)
	$(PY) validation.py --weights-path $(DEMO_OUT)/best.pth --data-path $(DEMO_DIR) \
		--output $(DEMO_OUT)/record_mAP.txt
	$(PY) predict.py --weights $(DEMO_OUT)/best.pth --output-dir $(DEMO_OUT)/predictions \
		$$(head -n 4 $(DEMO_DIR)/VOCdevkit/VOC2012/ImageSets/Main/val.txt | sed 's|.*|$(DEMO_VOC)/JPEGImages/&.jpg|')
	@echo
	@echo "Demo finished. Curves: $(DEMO_OUT)/loss_and_lr.png, $(DEMO_OUT)/mAP.png;" \
		"metrics: $(DEMO_OUT)/record_mAP.txt; annotated image: $(DEMO_OUT)/predictions/"
