package android.content;

public abstract class Context {
    public final String getString(int resId) {
        throw new RuntimeException("Stub!");
    }

    public final String getString(int resId, Object... formatArgs) {
        throw new RuntimeException("Stub!");
    }
}
