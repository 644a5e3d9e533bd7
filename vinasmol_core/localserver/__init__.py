"""Servers the project starts on the loopback interface and the helpers they share: free ports,
readiness polls and process lifetime (`localhost`), and a SeaweedFS S3 server (`seaweed`)."""
