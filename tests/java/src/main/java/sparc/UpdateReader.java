package sparc;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.JsonNodeFactory;
import java.io.ByteArrayOutputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
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
 * each part's size and sha256, each blob part against the manifest's sha256, and the manifest's format (1, or 2
 * with a vocabulary). The vocabulary (format 2) is checked whole, or rebuilt from the base's (found on the topic,
 * verified the same way, recursively) and the delta, and its sha256 compared with the manifest's; then it prints
 * the manifest.
 *
 * <p>Usage: UpdateReader BOOTSTRAP TOPIC MODEL VERSION|latest KEYFILE|- ; exit status 0 when the update was
 * found and verified, 1 otherwise (the reason on stderr).
 */
public final class UpdateReader {
  static final int MAJOR = 3;
  static final ObjectMapper JSON = new ObjectMapper();
  static final String IDS_BLOB = "item_ids.safetensors";
  static final String IDS_DELTA = "item_ids_delta.safetensors";
  static final int MAX_ID_CHARS = 256;

  /** One verified update: its header chunk, its parts by name, and a line saying what was checked. */
  record Verified(JsonNode header, Map<String, byte[]> parts, JsonNode manifest, String report) {}

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
    Verified best = null;
    List<String> problems = new ArrayList<>();
    for (Map.Entry<String, Collected> e : updates.entrySet()) {
      Collected c = e.getValue();
      if (!wanted.equals("latest") && c.version != Long.parseLong(wanted)) {
        continue;
      }
      try {
        Verified verified = verify(model, e.getKey(), c, key);
        if (best == null || verified.header().get("version").asLong() > best.header().get("version").asLong()) {
          best = verified;
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
    String vocabulary;
    try {
      vocabulary = vocabularyReport(model, best, updates, key);
    } catch (IllegalStateException ex) {
      System.err.println("refused: " + model + " v" + best.header().get("version").asLong() + ": " + ex.getMessage());
      System.exit(1);
      return;
    }
    System.err.println(best.report());
    System.err.println(vocabulary);
    System.out.write(best.parts().get("manifest.json"));
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

  /** The update verified; throws IllegalStateException naming what failed. */
  static Verified verify(String model, String updateSha, Collected c, byte[] key) throws Exception {
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
    checkFormat(m);
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
    String report = "verified " + model + " v" + c.version + ": manifest format " + m.get("format_version")
        + ", " + (chunks.size() + 1) + " chunks, parts " + new TreeMap<>(parts).keySet()
        + ", blobs checked against the manifest " + blobs.stream().sorted().toList() + ", signature " + signedBy;
    return new Verified(header, parts, m, report);
  }

  /** Format 1 (no vocabulary) or 2 (the vocabulary blob: one uint8 tensor item_ids); anything else is refused. */
  static void checkFormat(JsonNode m) {
    int format = m.path("format_version").asInt(-1);
    JsonNode ids = m.path("tensors").path("item_ids");
    if (format == 1 && ids.isMissingNode()) {
      return;
    }
    boolean vocabulary = ids.path("blob").asText().equals(IDS_BLOB) && ids.path("dtype").asText().equals("uint8")
        && ids.path("shape").size() == 1 && m.path("blobs").has(IDS_BLOB);
    if (format != 2 || !vocabulary) {
      throw new IllegalStateException("manifest format_version " + m.get("format_version")
          + " is not 1, or not 2 with the item_ids.safetensors vocabulary");
    }
  }

  /** What the update says of its vocabulary, once checked (section 6 of the contract). */
  static String vocabularyReport(String model, Verified v, Map<String, Collected> updates, byte[] key)
      throws Exception {
    long version = v.header().get("version").asLong();
    if (!v.manifest().path("tensors").has("item_ids")) {
      return "vocabulary of " + model + " v" + version + ": none (format 1: row i is item i)";
    }
    List<JsonNode> ids = vocabulary(model, v, updates, key, 0);
    String how = v.parts().containsKey(IDS_BLOB) ? "sent whole"
        : "rebuilt from v" + v.header().get("remap_from").asLong() + " and a delta of "
          + deltaRows(v.parts().get(IDS_DELTA)).length + " rows";
    return "vocabulary of " + model + " v" + version + ": " + how + ", " + ids.size() + " ids, sha256 "
        + sha256(idsJson(ids)) + ", the blob matches the manifest";
  }

  /** The ids of rows 1..N of a verified update: sent whole, or the base's (recursively) with the delta applied;
   * either way serialised as the contract writes them and checked against the manifest's blob sha256. */
  static List<JsonNode> vocabulary(String model, Verified v, Map<String, Collected> updates, byte[] key, int depth)
      throws Exception {
    JsonNode m = v.manifest();
    int n = m.path("tensors").path("item_codes").path("shape").get(0).asInt() - 1;
    if (!m.path("tensors").has("item_ids")) {
      List<JsonNode> identity = new ArrayList<>();
      for (int i = 1; i <= n; i++) {
        identity.add(JsonNodeFactory.instance.numberNode(i));
      }
      return identity;
    }
    List<JsonNode> ids;
    if (v.parts().containsKey(IDS_BLOB)) {
      ids = parseIds(tensor(v.parts().get(IDS_BLOB), "item_ids"));
    } else if (v.parts().containsKey(IDS_DELTA) && !v.header().path("remap_from").isNull() && depth < 64) {
      long base = v.header().get("remap_from").asLong();
      ids = new ArrayList<>(vocabulary(model, find(model, base, updates, key), updates, key, depth + 1));
      long[] rows = deltaRows(v.parts().get(IDS_DELTA));
      List<JsonNode> values = parseIds(tensor(v.parts().get(IDS_DELTA), "ids"));
      if (values.size() != rows.length) {
        throw new IllegalStateException("the vocabulary delta names " + values.size() + " ids for " + rows.length
            + " rows");
      }
      while (ids.size() > n) {
        ids.remove(ids.size() - 1);
      }
      int held = ids.size();
      for (int i = 0; i < rows.length; i++) {
        if (rows[i] < 1 || rows[i] > n || (i > 0 && rows[i] <= rows[i - 1])) {
          throw new IllegalStateException("the vocabulary delta's rows are not ascending in 1.." + n);
        }
        if (rows[i] > ids.size() + 1) {
          throw new IllegalStateException("the vocabulary delta skips row " + (ids.size() + 1));
        }
        if (rows[i] == ids.size() + 1) {
          ids.add(values.get(i));
        } else {
          ids.set((int) rows[i] - 1, values.get(i));
        }
      }
      if (ids.size() != n) {
        throw new IllegalStateException("the vocabulary delta leaves rows " + (held + 1) + ".." + n + " without ids");
      }
    } else {
      throw new IllegalStateException("the vocabulary is neither sent whole nor as a delta against a base");
    }
    checkIds(ids, n);
    byte[] text = idsJson(ids);
    JsonNode blob = m.path("blobs").path(IDS_BLOB);
    byte[] rebuilt = safetensorsU8("item_ids", text);
    if (blob.path("size").asLong() != rebuilt.length || !blob.path("sha256").asText().equals(sha256(rebuilt))) {
      throw new IllegalStateException("the vocabulary rebuilt differs from the manifest's item_ids.safetensors");
    }
    return ids;
  }

  /** The verified update of `version` on the topic (the base of a delta). */
  static Verified find(String model, long version, Map<String, Collected> updates, byte[] key) throws Exception {
    for (Map.Entry<String, Collected> e : updates.entrySet()) {
      if (e.getValue().version == version) {
        try {
          return verify(model, e.getKey(), e.getValue(), key);
        } catch (IllegalStateException ex) {
          System.err.println("refused base: " + model + " v" + version + ": " + ex.getMessage());
        }
      }
    }
    throw new IllegalStateException("the base v" + version + " of the vocabulary delta is not on the topic");
  }

  /** Each id an integer within int64 or a string of 1 to 256 characters; all distinct; n of them. */
  static void checkIds(List<JsonNode> ids, int n) {
    Set<String> seen = new HashSet<>();
    for (JsonNode id : ids) {
      boolean ok = id.isIntegralNumber() ? id.canConvertToLong()
          : id.isTextual() && id.textValue().codePointCount(0, id.textValue().length()) >= 1
            && id.textValue().codePointCount(0, id.textValue().length()) <= MAX_ID_CHARS;
      if (!ok || !seen.add((id.isTextual() ? "s:" : "i:") + id.asText())) {
        throw new IllegalStateException("the vocabulary holds an invalid or repeated id " + id);
      }
    }
    if (ids.size() != n) {
      throw new IllegalStateException("the vocabulary names " + ids.size() + " ids for " + n + " items");
    }
  }

  static List<JsonNode> parseIds(byte[] text) throws Exception {
    JsonNode array = JSON.readTree(text);
    if (array == null || !array.isArray()) {
      throw new IllegalStateException("the vocabulary is not a JSON array");
    }
    List<JsonNode> out = new ArrayList<>();
    array.forEach(out::add);
    return out;
  }

  /** The ids as the contract writes them: Python's json.dumps(ids, ensure_ascii=False, separators=(",", ":")). */
  static byte[] idsJson(List<JsonNode> ids) {
    StringBuilder b = new StringBuilder("[");
    for (int i = 0; i < ids.size(); i++) {
      b.append(i == 0 ? "" : ",");
      JsonNode id = ids.get(i);
      if (id.isIntegralNumber()) {
        b.append(id.bigIntegerValue());
        continue;
      }
      b.append('"');
      id.textValue().codePoints().forEach(c -> {
        switch (c) {
          case '"' -> b.append("\\\"");
          case '\\' -> b.append("\\\\");
          case '\b' -> b.append("\\b");
          case '\t' -> b.append("\\t");
          case '\n' -> b.append("\\n");
          case '\f' -> b.append("\\f");
          case '\r' -> b.append("\\r");
          default -> {
            if (c < 0x20) {
              b.append(String.format("\\u%04x", c));
            } else {
              b.appendCodePoint(c);
            }
          }
        }
      });
      b.append('"');
    }
    return b.append(']').toString().getBytes(StandardCharsets.UTF_8);
  }

  /** A safetensors file holding one uint8 tensor, as the Python writer lays it out (header padded with spaces). */
  static byte[] safetensorsU8(String name, byte[] data) {
    String header = "{\"" + name + "\":{\"dtype\":\"U8\",\"shape\":[" + data.length + "],\"data_offsets\":[0,"
        + data.length + "]}}";
    header = header + " ".repeat((8 - header.length() % 8) % 8);
    byte[] h = header.getBytes(StandardCharsets.US_ASCII);
    ByteBuffer out = ByteBuffer.allocate(8 + h.length + data.length).order(ByteOrder.LITTLE_ENDIAN);
    return out.putLong(h.length).put(h).put(data).array();
  }

  /** The bytes of tensor `name` of a safetensors file (its header's data_offsets). */
  static byte[] tensor(byte[] file, String name) throws Exception {
    ByteBuffer in = ByteBuffer.wrap(file).order(ByteOrder.LITTLE_ENDIAN);
    long length = in.getLong();
    if (length < 2 || length > file.length - 8) {
      throw new IllegalStateException("not a safetensors file");
    }
    JsonNode info = JSON.readTree(Arrays.copyOfRange(file, 8, 8 + (int) length)).path(name);
    JsonNode offsets = info.path("data_offsets");
    long begin = 8 + length + offsets.path(0).asLong(-1), end = 8 + length + offsets.path(1).asLong(-1);
    if (offsets.size() != 2 || begin < 8 + length || end < begin || end > file.length) {
      throw new IllegalStateException("safetensors tensor " + name + " is missing or out of bounds");
    }
    return Arrays.copyOfRange(file, (int) begin, (int) end);
  }

  /** The int64 little-endian `rows` of a vocabulary delta. */
  static long[] deltaRows(byte[] delta) throws Exception {
    byte[] raw = tensor(delta, "rows");
    if (raw.length % 8 != 0) {
      throw new IllegalStateException("the vocabulary delta's rows are not int64");
    }
    long[] rows = new long[raw.length / 8];
    ByteBuffer.wrap(raw).order(ByteOrder.LITTLE_ENDIAN).asLongBuffer().get(rows);
    return rows;
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
