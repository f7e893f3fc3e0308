# Shortcuts; each one is a ./course command (which sets up .venv first when needed).
.PHONY: lab test labs check-labs bench soak reset doctor lint

lab:         ## set up and open the course in JupyterLab
	./course open
test:        ## set up and run every test (what CI runs)
	./course test
labs:        ## regenerate notebooks/, labs/ and solutions/ from sources/
	./course build
check-labs:  ## fail if a generated notebook is out of date
	./course build --check
bench:       ## print the figures of docs/benchmarks.md
	./course bench --notebooks
soak:        ## the whole suite 5 times in a row, then 3 times with a busy loop beside it
	./course bench --soak 5 && ./course bench --soak 3 --hog 1
reset:       ## stop leftovers, delete runtime files (add LABS=1 to restore labs/)
	./course reset $(if $(LABS),--labs,)
doctor:      ## what is installed, what answers, what is left running
	./course doctor
lint:
	.venv/bin/ruff check .
