raise ImportError("this entry point is broken on purpose (mixprec test plugin)")
