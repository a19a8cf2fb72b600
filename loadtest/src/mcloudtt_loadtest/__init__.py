"""MCloudTT load tests: `mcloudtt-bench`, the head-to-head benchmark against Mosquitto and amqtt."""
