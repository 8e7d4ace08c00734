"""selfspec's vLLM CPU plugin: grouped multi-LoRA ops, the engine core's nap, and moving Ray
Serve's processes off vLLM's worker cores. Installed on CPU machines only (`make setup`);
selfspec never imports it, vLLM and the Serve engine find it through entry points."""
