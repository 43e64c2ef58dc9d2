"""The paper (Fu et al. 2021): its published numbers, the reproduction of its tables and
figures (`sddecc reproduce`), and the report that puts our runs beside its numbers."""
