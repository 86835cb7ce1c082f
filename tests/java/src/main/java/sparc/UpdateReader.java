package sparc;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.MessageDigest;
import java.security.PublicKey;
import java.security.Signature;
import java.security.spec.X509EncodedKeySpec;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Base64;
import java.util.HashMap;
import java.util.HashSet;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.TreeMap;
import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * Reads one codebook update from Kafka without Python, following docs/codebook-updates.md only: collects the
 * records of a model, verifies each chunk's sha256, the header chunk against the update sha256, the signature
 * (Ed25519 public key in PEM, or an HMAC-SHA256 key file), every other chunk against the header chunk's list,
 * each part's size and sha256, and each blob part against the manifest's sha256; then prints the manifest.
 *
 * <p>Usage: UpdateReader BOOTSTRAP TOPIC MODEL VERSION|latest KEYFILE|- ; exit status 0 when the update was
 * found and verified, 1 otherwise (the reason on stderr).
 */
public final class UpdateReader {
  static final int MAJOR = 3;
  static final ObjectMapper JSON = new ObjectMapper();

  /** One update as its records arrived: chunk index to the copies seen (a bad copy may sit beside a good one). */
  static final class Collected {
    final Map<Integer, List<byte[]>> copies = new HashMap<>();
    final List<String> signatures = new ArrayList<>();
    long version;
  }

  public static void main(String[] args) throws Exception {
    if (args.length != 5) {
      System.err.println("usage: UpdateReader BOOTSTRAP TOPIC MODEL VERSION|latest KEYFILE|-");
      System.exit(2);
    }
    String bootstrap = args[0], topic = args[1], model = args[2], wanted = args[3];
    byte[] key = args[4].equals("-") ? null : Files.readAllBytes(Path.of(args[4]));
    Map<String, Collected> updates = read(bootstrap, topic, model);
    JsonNode best = null;
    byte[] bestManifest = null;
    String bestReport = null;
    List<String> problems = new ArrayList<>();
    for (Map.Entry<String, Collected> e : updates.entrySet()) {
      Collected c = e.getValue();
      if (!wanted.equals("latest") && c.version != Long.parseLong(wanted)) {
        continue;
      }
      try {
        Object[] verified = verify(model, e.getKey(), c, key);
        JsonNode header = (JsonNode) verified[0];
        if (best == null || header.get("version").asLong() > best.get("version").asLong()) {
          best = header;
          bestManifest = (byte[]) verified[1];
          bestReport = (String) verified[2];
        }
      } catch (IllegalStateException ex) {
        problems.add(model + " v" + c.version + " (" + e.getKey().substring(0, 12) + "): " + ex.getMessage());
      }
    }
    problems.forEach(p -> System.err.println("refused: " + p));
    if (best == null) {
      System.err.println("no verified update of " + model + " v" + wanted + " on " + topic);
      System.exit(1);
    }
    System.err.println(bestReport);
    System.out.write(bestManifest);
    System.out.flush();
  }

  /** Every record of `model` on `topic`, from the beginning to the end offsets at the time of the call. */
  static Map<String, Collected> read(String bootstrap, String topic, String model) {
    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    Map<String, Collected> out = new TreeMap<>();
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      List<TopicPartition> parts = new ArrayList<>();
      for (PartitionInfo p : consumer.partitionsFor(topic, Duration.ofSeconds(30))) {
        parts.add(new TopicPartition(topic, p.partition()));
      }
      consumer.assign(parts);
      consumer.seekToBeginning(parts);
      Map<TopicPartition, Long> end = consumer.endOffsets(parts);
      long deadline = System.currentTimeMillis() + 60_000;
      while (parts.stream().anyMatch(tp -> consumer.position(tp) < end.get(tp))) {
        if (System.currentTimeMillis() > deadline) {
          throw new IllegalStateException("did not reach the end of " + topic + " in 60 s");
        }
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(500))) {
          collect(r, model, out);
        }
      }
    }
    return out;
  }

  static void collect(ConsumerRecord<byte[], byte[]> r, String model, Map<String, Collected> out) {
    Map<String, String> h = new HashMap<>();
    for (Header header : r.headers()) {
      h.put(header.key(), new String(header.value(), StandardCharsets.US_ASCII));
    }
    String schema = h.getOrDefault("schema", "");
    if (!schema.matches("sparc\\.codebook-update/" + MAJOR + "(\\.\\d+)?")
        || !model.equals(h.get("model"))
        || r.key() == null
        || !model.equals(new String(r.key(), StandardCharsets.UTF_8))) {
      return; // another major, another model, or not an update record
    }
    if (!sha256(r.value()).equals(h.get("chunk-sha256"))) {
      System.err.println("skipped a chunk failing its sha256 at offset " + r.offset());
      return;
    }
    Collected c = out.computeIfAbsent(h.get("update-sha256"), k -> new Collected());
    c.version = Long.parseLong(h.get("version"));
    int index = Integer.parseInt(h.get("chunk"));
    c.copies.computeIfAbsent(index, k -> new ArrayList<>()).add(r.value());
    if (index == 0 && h.containsKey("signature")) {
      c.signatures.add(h.get("signature"));
    }
  }

  /** {header chunk JSON, manifest bytes, report line}; throws IllegalStateException naming what failed. */
  static Object[] verify(String model, String updateSha, Collected c, byte[] key) throws Exception {
    byte[] head = pick(c, 0, updateSha, "the header chunk (hashing to the update sha256)");
    String signedBy = "unchecked (no key given)";
    if (key != null) {
      String text = "sparc.codebook-update/" + MAJOR + "\n" + model + "\n" + c.version + "\n" + updateSha;
      signedBy = null;
      for (String signature : c.signatures) {
        signedBy = checkSignature(key, text.getBytes(StandardCharsets.US_ASCII), signature);
        if (signedBy != null) {
          break;
        }
      }
      if (signedBy == null) {
        throw new IllegalStateException(c.signatures.isEmpty() ? "unsigned" : "no valid signature by the key given");
      }
    }
    JsonNode header = JSON.readTree(head);
    if (!header.path("model").asText().equals(model) || header.path("version").asLong() != c.version
        || !header.path("schema").asText().matches("sparc\\.codebook-update/" + MAJOR + "(\\.\\d+)?")) {
      throw new IllegalStateException("the header chunk does not describe this update");
    }
    ByteArrayOutputStream data = new ByteArrayOutputStream();
    JsonNode chunks = header.get("chunks");
    for (int i = 1; i <= chunks.size(); i++) {
      data.write(pick(c, i, chunks.get(i - 1).asText(), "chunk " + i));
    }
    byte[] all = data.toByteArray();
    Map<String, byte[]> parts = new HashMap<>();
    int offset = 0;
    for (JsonNode part : header.get("parts")) {
      int size = part.get("size").asInt();
      if (offset + size > all.length) {
        throw new IllegalStateException("parts add up to more than the chunks hold");
      }
      byte[] bytes = Arrays.copyOfRange(all, offset, offset + size);
      offset += size;
      if (!sha256(bytes).equals(part.get("sha256").asText())) {
        throw new IllegalStateException("part " + part.get("name").asText() + " fails its sha256");
      }
      parts.put(part.get("name").asText(), bytes);
    }
    if (offset != all.length) {
      throw new IllegalStateException("the chunks hold bytes beyond the parts");
    }
    byte[] manifest = parts.get("manifest.json");
    if (manifest == null) {
      throw new IllegalStateException("no manifest.json part");
    }
    JsonNode m = JSON.readTree(manifest);
    if (!m.path("model").asText().equals(model) || m.path("version").asLong() != c.version) {
      throw new IllegalStateException("the manifest describes another snapshot");
    }
    Set<String> blobs = new HashSet<>();
    for (Map.Entry<String, byte[]> part : parts.entrySet()) {
      JsonNode blob = m.path("blobs").get(part.getKey());
      if (blob == null) {
        continue; // not a blob of the snapshot: the manifest itself, the remap, or a part of a later minor
      }
      if (blob.get("size").asInt() != part.getValue().length
          || !blob.get("sha256").asText().equals(sha256(part.getValue()))) {
        throw new IllegalStateException("blob " + part.getKey() + " differs from the manifest's sha256");
      }
      blobs.add(part.getKey());
    }
    String report = "verified " + model + " v" + c.version + ": " + (chunks.size() + 1) + " chunks, parts "
        + new TreeMap<>(parts).keySet() + ", blobs checked against the manifest " + blobs.stream().sorted().toList() + ", signature " + signedBy;
    return new Object[] {header, manifest, report};
  }

  /** The copy of chunk `index` whose sha256 is `sha`. */
  static byte[] pick(Collected c, int index, String sha, String what) {
    for (byte[] copy : c.copies.getOrDefault(index, List.of())) {
      if (sha256(copy).equals(sha)) {
        return copy;
      }
    }
    throw new IllegalStateException(what + " is missing");
  }

  /** The key id when `header` ("scheme:keyid:base64") is a valid signature of `text` by `key`, else null. */
  static String checkSignature(byte[] key, byte[] text, String header) throws Exception {
    String[] f = header.split(":");
    byte[] signature;
    try {
      signature = f.length == 3 ? Base64.getDecoder().decode(f[2]) : null;
    } catch (IllegalArgumentException e) {
      signature = null;
    }
    if (signature == null) {
      return null;
    }
    String pem = new String(key, StandardCharsets.US_ASCII);
    if (pem.startsWith("-----BEGIN PUBLIC KEY-----")) {
      byte[] der = Base64.getMimeDecoder().decode(pem.replaceAll("-----[A-Z ]+-----", "").trim());
      byte[] raw = Arrays.copyOfRange(der, der.length - 32, der.length);
      String id = sha256(raw).substring(0, 16);
      PublicKey publicKey = KeyFactory.getInstance("Ed25519").generatePublic(new X509EncodedKeySpec(der));
      Signature verifier = Signature.getInstance("Ed25519");
      verifier.initVerify(publicKey);
      verifier.update(text);
      try {
        return f[0].equals("ed25519") && f[1].equals(id) && verifier.verify(signature) ? "ed25519 key " + id : null;
      } catch (java.security.SignatureException e) {
        return null;
      }
    }
    String id = HexFormat.of().formatHex(hmac(key, "sparc key id".getBytes(StandardCharsets.US_ASCII)))
        .substring(0, 16);
    boolean ok = f[0].equals("hmac-sha256") && f[1].equals(id) && MessageDigest.isEqual(hmac(key, text), signature);
    return ok ? "hmac-sha256 key " + id : null;
  }

  static byte[] hmac(byte[] key, byte[] text) throws Exception {
    Mac mac = Mac.getInstance("HmacSHA256");
    mac.init(new SecretKeySpec(key, "HmacSHA256"));
    return mac.doFinal(text);
  }

  static String sha256(byte[] data) {
    try {
      return HexFormat.of().formatHex(MessageDigest.getInstance("SHA-256").digest(data));
    } catch (java.security.NoSuchAlgorithmException e) {
      throw new IllegalStateException(e);
    }
  }
}
