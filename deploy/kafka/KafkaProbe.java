// Readiness probe for deploy/kafka/broker.sh: asks a broker, through Kafka's own Admin client, to describe its
// cluster and list its topics. Exit 0 and one line ("cluster <id>: <n> broker(s), <t> topic(s)") when it
// answers, exit 1 with the reason on stderr when it does not. An open port is not readiness; this is.
//
// Run as a single-file source program with the broker's jars on the class path:
//   java -cp '<libs>/*' KafkaProbe.java 127.0.0.1:39092 [timeout-ms]

import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterOptions;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.clients.admin.ListTopicsOptions;

public class KafkaProbe {
    public static void main(String[] args) {
        String bootstrap = args.length > 0 ? args[0] : "127.0.0.1:39092";
        int timeoutMs = args.length > 1 ? Integer.parseInt(args[1]) : 5000;
        Properties props = new Properties();
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, timeoutMs);
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, timeoutMs);
        props.put(AdminClientConfig.CLIENT_ID_CONFIG, "sparc-kafka-probe");
        try (Admin admin = Admin.create(props)) {
            DescribeClusterResult cluster = admin.describeCluster(new DescribeClusterOptions().timeoutMs(timeoutMs));
            String clusterId = cluster.clusterId().get(timeoutMs, TimeUnit.MILLISECONDS);
            int brokers = cluster.nodes().get(timeoutMs, TimeUnit.MILLISECONDS).size();
            int topics = admin.listTopics(new ListTopicsOptions().timeoutMs(timeoutMs))
                    .names().get(timeoutMs, TimeUnit.MILLISECONDS).size();
            System.out.println("cluster " + clusterId + ": " + brokers + " broker(s), " + topics + " topic(s)");
        } catch (Exception e) {
            Throwable cause = e.getCause() != null ? e.getCause() : e;
            System.err.println("no answer from " + bootstrap + ": " + cause);
            System.exit(1);
        }
        System.exit(0);
    }
}
