package android.widget;

import android.view.View;

public class RadioGroup extends View {
    public int getCheckedRadioButtonId() {
        throw new RuntimeException("Stub!");
    }
}
