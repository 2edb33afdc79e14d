# Two commands for a newcomer:
#   make demo   generate a synthetic chest CT from a sample report with the bundled model
#   make test   run the test suite (CPU only, no network)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
REPORT ?= Resources/SampleReports/normal_chest.txt
OUT    ?= out/demo.nii.gz

.PHONY: demo test venv clean

$(VENV)/.installed: constraints.txt CTFlowLib/pyproject.toml CTFlowLib/requirements.txt \
                  CTFlowLib/setup.py training/pyproject.toml requirements-test.txt
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' || { \
	  echo "ctflow needs Python 3.10-3.12, and $(PYTHON) is $$($(PYTHON) -V 2>&1); choose one, e.g. make test PYTHON=python3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e CTFlowLib -e training -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	mkdir -p $(dir $(OUT))
	$(VENV)/bin/ctflow generate --report-file $(REPORT) --out $(OUT) --preview $(OUT:.nii.gz=.png) --overwrite

test: venv
	OMP_WAIT_POLICY=PASSIVE QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1 $(PY) -m pytest Testing -q

clean:
	rm -rf $(VENV) Testing/_output
