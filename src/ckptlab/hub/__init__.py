"""Model hubs: the CivitAI client and ``civitai link`` (``civitai``, ``link``, ``store``,
``sidecars``), verified resumable downloads (``download``, ``fetch``, ``destination``) and Hugging Face
(``huggingface``). Submodules import httpx/huggingface_hub lazily; see docs/hub.md."""
