"""jupyter-sandbox"""
