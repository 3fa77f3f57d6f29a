"""Kubernetes objects Argus renders and the custom resources its operators reconcile."""
