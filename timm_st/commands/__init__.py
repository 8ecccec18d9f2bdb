"""The commands: `timm-st train|analyze|publish` (`cli`), each a parser and a `main` over `timm_st.runs`,
and `hook`, the module timm's own train.py imports (recipes' `device_modules`)."""
