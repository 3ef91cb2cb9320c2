toplevel = "sandbox_toplevel"
