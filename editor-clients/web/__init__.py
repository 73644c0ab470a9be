"""The browser demo page (index.html), installed as package data of livekv.web: `livekv serve
--demo` serves it from an installed wheel as well as from a checkout."""
